"""``hisam bench stream``: stream throughput and freshness, against Feast's own write path.

What it measures, each on a fresh broker and a private Redis started here:

* ``actions_per_s`` (per backend): the rate one worker sustains. One real stream worker
  process drains a backlog of user-actions (``--steady-actions`` over ``--users`` users),
  users who start at the steady state: a full stream (T items) and a full seen window (W
  ids), the state every active user reaches. The rate is the count over the time between
  its first and last emitted TrainingSample (each sample is produced after its append is
  in the store), so it is the whole pipeline: fetch, decode, item lookup, atomic append,
  sample produce, commit. Then each user's stream must end with its backlog events,
  exactly once and in order, or the benchmark fails. The append script's work and the
  samples' histories grow with the stream: on this 2-core machine, at the steady state,
  Redis and the broker (which share the CPU with the worker) cost more per action than
  the worker does.
* ``actions_per_s_empty_streams``: the same drain (``--actions``) by users who start with
  no stream, as this benchmark measured ``actions_per_s`` before: an upper bound (the
  streams stay short), not a rate a worker sustains.
* ``freshness_p50_ms`` / ``p90`` / ``p99``: with a worker loaded at half ``actions_per_s``
  or at ``--freshness-rate`` (by another process, on the steady-state users; on a broker
  of its own; ``freshness_load_actions_per_s``), probe actions
  are produced one at a time and timed until ``FeatureStore.get_online_features`` returns
  them (produce -> visible through Feast, one Feast read included; the wait is polled
  with a cheap direct read, so that the measuring does not starve the worker of CPU). A
  probe not visible after 30 s counts as 30 s (``freshness_timeouts``).
* ``samples_retention_ms`` (``--samples-retention-ms``, 0: keep all): the bench's brokers
  keep the training-samples topic only that long (``stream.topics.retention_configs``).
  Nothing reads the samples here after they are counted, and the embedded broker rewrites
  everything it holds about once a second, at a CPU cost proportional to it (measured: 3,000
  samples/s of 3.3 KB alone cost it 0.7 of a core and growing, 0.4 with a 1 s retention);
  Apache Kafka appends to segment files and pays no such cost for what it retains. The
  samples are most of what the broker holds (each carries the user's T-item history).
* ``loadavg_1m``: the machine's 1-minute load average before the drain and after the
  freshness probes (other jobs on the machine take CPU from the worker: compare runs only
  at similar load).
* ``drain_cpu_us_per_action``: CPU time per action over the steady-state drain of the
  worker, the broker and (Redis backend) Redis, from /proc: where the machine's cores go
  at the rate reported.
* ``redis_cpu_us_per_action`` (Redis): the Redis server's share of that (its item reads
  and the append script); ``..._empty_streams`` for the other drain.
* ``store_appends_per_s``: the append alone (``append_batch`` of 500) in this process.
* ``feast_baseline``: the same appends done the only way Feast offers, read-modify-write
  (``get_online_features`` then ``write_to_online_store``, batches of 500), in this
  process on the same Redis: the ratio is ours over Feast's. (It also loses updates
  under concurrent writers, which tests/features/test_online_store.py shows ours does not.)
* ``reads``: 64 users x T items through Feast vs the direct fast path.
* ``items_per_s``: item ingestion (decode, frozen tokenizer, ID claim, write) in this process.

The last line of output is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from hisam.bench.stream.appends import bench_feast_rmw, bench_reads, bench_store_appends
from hisam.bench.stream.common import N_CODES, service_pids
from hisam.bench.stream.drain import bench_drain
from hisam.bench.stream.freshness import bench_freshness
from hisam.bench.stream.items import bench_items

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--actions", type=int, default=20_000, help="backlog drained by users with no stream yet (0: skip)"
    )
    parser.add_argument(
        "--steady-actions", type=int, default=20_000, help="backlog drained by users at the steady state"
    )
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--probes", type=int, default=100, help="freshness probes per backend")
    parser.add_argument("--stream-len", type=int, default=300)
    parser.add_argument("--within-ms", type=float, default=0.0, help="worker batch wait (as the worker's default)")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer dir for items_per_s (default: train a tiny one)"
    )
    parser.add_argument("--backends", default="redis,sqlite")
    parser.add_argument("--batch-size", type=int, default=None, help="the worker's --batch-size (default: its own)")
    parser.add_argument("--seen-window", type=int, default=1024, help="W of the store and the worker")
    parser.add_argument(
        "--samples-retention-ms",
        type=int,
        default=5_000,
        help="retention of the training-samples topic on the bench's brokers (0: the broker's default, keep all)",
    )
    parser.add_argument(
        "--freshness-rate",
        type=float,
        default=None,
        help="load (actions/s) during the freshness probes (default: half the measured actions_per_s)",
    )


def main(args: argparse.Namespace) -> int:
    from features.store import OnlineStoreConfig, open_feature_store
    from infra.services import kafka_broker, redis_server

    # SIGTERM must unwind the ExitStack below, or the broker and Redis outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict = {}
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hisam-bench-")))
        redis = stack.enter_context(redis_server())
        cfgs = {
            b: OnlineStoreConfig(
                backend=b,
                repo_dir=tmp / f"repo-{b}",
                redis_url=redis.url if b == "redis" else None,
                stream_len=args.stream_len,
                n_codes=N_CODES,
                seen_window=args.seen_window,
            )
            for b in ("redis", "sqlite")
        }
        stores = {b: open_feature_store(cfgs[b]) for b in backends}  # Feast import + apply, once
        for b in backends:
            cfg = cfgs[b]
            log.info("%s: in-process append and read benchmarks", b)
            n_store = min(args.actions or args.steady_actions, 10_000)
            row = {"store_appends_per_s": bench_store_appends(cfg, n_store, args.users, args.items)}
            row["reads_64_users"] = bench_reads(cfg, stores[b])
            # A fresh broker per run: its worker drains only its own backlog.
            if args.actions:
                with kafka_broker() as broker:
                    empty = bench_drain(cfg, broker.bootstrap, args, tmp, False, service_pids(broker, redis, b))
                row["actions_per_s_empty_streams"] = empty["actions_per_s"]
                if "redis_cpu_us_per_action" in empty:
                    row["redis_cpu_us_per_action_empty_streams"] = empty["redis_cpu_us_per_action"]
                row["loadavg_1m_empty_streams"] = empty["loadavg_1m"]
            with kafka_broker() as broker:
                row.update(bench_drain(cfg, broker.bootstrap, args, tmp, True, service_pids(broker, redis, b)))
            if args.probes:
                with kafka_broker() as broker:
                    rate = args.freshness_rate or row["actions_per_s"] / 2
                    pids = service_pids(broker, redis, b)
                    row.update(bench_freshness(cfg, stores[b], broker.bootstrap, args, tmp, rate, pids))
            results[b] = row
        feast_fs = stores.get("redis") or open_feature_store(cfgs["redis"])
        n_feast = min(args.actions or args.steady_actions, 5_000)
        feast_rate = bench_feast_rmw(feast_fs, n_feast, args.users, args.items)
        results["feast_baseline"] = {
            "actions_per_s": feast_rate,
            "method": "read-modify-write: get_online_features + write_to_online_store, batches of 500, Redis",
        }
        for b in backends:
            results[b]["store_vs_feast"] = results[b]["store_appends_per_s"] / feast_rate
        tok_dir = args.tokenizer
        if tok_dir is None:
            import torch

            from recipes.tokenizer.testing import tiny_tokenizer

            tok_dir = tmp / "tokenizer"
            log.info("training a tiny tokenizer for the item benchmark (pass --tokenizer to use yours)")
            torch.set_num_threads(1)  # the worker runs the tokenizer on one thread too
            tiny_tokenizer(tok_dir, n_items=256, epochs=3)
        results["items_per_s"] = bench_items(cfgs["redis"], tok_dir)
    _write_results(results, backends)
    return 0


def _write_results(results: dict, backends: list[str]) -> None:
    """The table, then every figure as one JSON object on the last line."""
    out = sys.stdout
    out.write(
        f"\n{'':16}{'actions/s':>11}{'(empty)':>10}{'fresh p50 ms':>14}{'fresh p99 ms':>14}{'append/s':>11}"
        f"{'vs feast':>10}{'read feast/direct ms':>24}\n"
    )
    for b in backends:
        r = results[b]
        rd = r["reads_64_users"]
        out.write(
            f"{b:16}{r['actions_per_s']:>11.0f}{r.get('actions_per_s_empty_streams', float('nan')):>10.0f}"
            f"{r.get('freshness_p50_ms', float('nan')):>14.1f}{r.get('freshness_p99_ms', float('nan')):>14.1f}"
            f"{r['store_appends_per_s']:>11.0f}"
            f"{r['store_vs_feast']:>9.1f}x{rd['feast_ms']:>13.1f} / {rd['direct_ms']:.1f}\n"
        )
    out.write(
        f"{'feast_baseline':16}{'':>11}{'':>10}{'':>14}{'':>14}{results['feast_baseline']['actions_per_s']:>11.0f}"
        f"{1.0:>9.1f}x\n"
    )
    out.write(f"items/s (tokenize + write): {results['items_per_s']:.0f}\n")
    out.write(json.dumps(results) + "\n")
