"""The embedded default end to end: real broker, worker process, Feast's SQLite online store."""

from __future__ import annotations

import uuid
from collections import defaultdict

import pytest

from features.store import ItemSids, OnlineStoreConfig, feast_read_streams, open_feature_store, open_stream_store
from stream import producer as prod
from stream import records as rec
from stream import topics as tp
from stream.testing import WorkerProcess, wait_until

pytestmark = pytest.mark.kafka

T, N_CODES = 20, 6
RUN = uuid.uuid4().hex[:8]
BASE = 7_000_000_000 + (uuid.uuid4().int % 1_000_000) * 1000  # ids unique per run


def test_sqlite_worker_appends_every_action_once_in_order(kafka_bootstrap, tmp_path) -> None:
    cfg = OnlineStoreConfig(backend="sqlite", repo_dir=tmp_path / "repo", stream_len=T, n_codes=N_CODES)
    fs = open_feature_store(cfg)
    store = open_stream_store(cfg)
    store.put_item_sids(
        [ItemSids(BASE + i, tuple(BASE + i * 10 + j for j in range(N_CODES)), "v", 0) for i in range(10)]
    )
    tp.ensure_topics(kafka_bootstrap, tp.default_topics(4))
    worker = WorkerProcess(
        [
            "--bootstrap", kafka_bootstrap, "--backend", "sqlite", "--repo-dir", str(cfg.repo_dir),
            "--stream-len", str(T), "--app-id", f"hisam-sqlite-{RUN}", "--instance-id", f"sqlite-{RUN}",
        ],
        tmp_path / "worker.log",
    )  # fmt: skip
    worker.start()
    producer = prod.make_producer(kafka_bootstrap)
    try:
        evs = [
            rec.action_event(f"{RUN}-{k}", BASE + k % 5, BASE + k % 10, 1 + k % 5, 1_700_000_000_000 + k)
            for k in range(300)
        ]
        prod.produce_actions(producer, evs)
        users = sorted({e.user_id for e in evs})

        def all_in() -> bool:
            got = fs.get_online_features(
                features=["user_profile:n_actions"], entity_rows=[{"user_id": u} for u in users]
            ).to_dict()
            return sum(n or 0 for n in got["n_actions"]) >= len(evs)

        wait_until(all_in, 60, 0.2, f"all appends (worker log: {worker.log_path})")
        by_user = defaultdict(list)
        for e in evs:
            by_user[e.user_id].append(e.event_id)
        for s in feast_read_streams(fs, users, N_CODES):
            assert s.event_ids == by_user[s.user_id][-T:]
    finally:
        producer.close()
        worker.stop()
        store.close()
