"""The stream worker's Prometheus metrics (issue 7): counters move by exactly what the worker did.

A real worker process with ``--metrics-port`` consumes a known set of actions: good ones on
known items, duplicates of them (redelivered event ids) and actions on an unknown item.
Its ``/metrics`` must count each, with the dead letters by reason, and expose the freshness
histogram, the batch latency and the consumer lag.
"""

from __future__ import annotations

import time
import urllib.request
import uuid

import pytest

from features.store import ItemSids, OnlineStoreConfig, open_stream_store
from infra.observability import parse_metrics
from infra.ports import free_port
from infra.services import kafka_broker
from stream import producer as prod
from stream import records as rec
from stream import topics as tp
from stream.testing import WorkerProcess, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.redis]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return parse_metrics(r.read().decode())


def test_worker_metrics_count_exactly_what_it_did(tmp_path, redis_url) -> None:
    # A broker of its own: the session's topics hold other tests' actions, which a new group would read too.
    with kafka_broker() as broker:
        _check_metrics(tmp_path, broker.bootstrap, redis_url)


def _check_metrics(tmp_path, kafka_bootstrap: str, redis_url: str) -> None:
    run = uuid.uuid4().hex[:8]
    base = 30_000_000 + (int(run, 16) % 100_000) * 100
    # A namespace of its own: the session's Redis holds other tests' (of other layouts: the layout guard).
    cfg = OnlineStoreConfig(
        backend="redis", redis_url=redis_url, repo_dir=tmp_path / "fr", project=f"m_{run}", stream_len=20, n_codes=6
    )
    store = open_stream_store(cfg)
    store.put_item_sids([ItemSids(base + i, tuple(range(i * 6, i * 6 + 6)), "m-v", 0) for i in range(5)])
    tp.ensure_topics(kafka_bootstrap, tp.default_topics(4))
    port = free_port()
    worker = WorkerProcess(
        ["--bootstrap", kafka_bootstrap, "--backend", "redis", "--redis-url", redis_url, "--repo-dir",
         str(cfg.repo_dir), "--project", cfg.project, "--stream-len", "20", "--app-id", f"hisam-metrics-{run}",
         "--instance-id", f"m-{run}",
         "--metrics-port", str(port), "--unknown-item-max-age", "2"],
        tmp_path / "worker.log",
    )  # fmt: skip
    worker.start()
    producer = prod.make_producer(kafka_bootstrap)
    try:
        good = [rec.action_event(f"{run}-{k}", base + k % 3, base + k % 5, 1, 1_700_000_000_000 + k) for k in range(40)]
        unknown = [rec.action_event(f"{run}-u{k}", base, base + 99, 1, 1_700_000_000_100 + k) for k in range(3)]
        prod.produce_actions(producer, good + good[:10] + unknown)  # 10 redelivered ids
        consumed = ("hisam_stream_actions_consumed_total", ())
        unknown_item = ("hisam_stream_dead_letters_total", (("reason", rec.UNKNOWN_ITEM),))

        def done():
            try:
                m = _scrape(port)
            except OSError:
                return False
            return m.get(consumed, 0) >= 53 and m.get(unknown_item, 0) >= 3

        # The actions on the unknown item are retried for --unknown-item-max-age (2 s) first.
        wait_until(done, 120, 0.3, "the worker consuming all 53 actions and dead-lettering the unknown item's")
        time.sleep(1.0)
        m = _scrape(port)
        assert m[consumed] == 53
        assert m[("hisam_stream_actions_appended_total", ())] == 40
        assert m[("hisam_stream_action_duplicates_total", ())] == 10
        assert m[unknown_item] == 3
        # A duplicate still in the stream re-emits its sample (stream/processing.py): 40 + 10.
        assert m[("hisam_stream_samples_produced_total", ())] == 50
        assert m[("hisam_stream_freshness_seconds_count", (("agent", "actions"),))] == 53
        assert m[("hisam_stream_batch_latency_seconds_count", (("agent", "actions"),))] >= 1
        lags = [v for (name, _), v in m.items() if name == "hisam_stream_consumer_lag_records"]
        assert lags and all(v >= 0 for v in lags)
    finally:
        producer.close()
        worker.stop()
        store.close()
