"""``hisam bench stream``: stream throughput and freshness, against Feast's own write path.

What it measures, each on a fresh broker and a private Redis started here:

* ``actions_per_s`` (per backend): one real stream worker process drains a backlog of
  user-actions; the rate is the count over the time between its first and last emitted
  TrainingSample (each sample is produced after its append is in the store), so it is the
  whole pipeline: fetch, decode, item lookup, atomic append, sample produce, commit.
* ``freshness_p50_ms`` / ``p99``: with the worker loaded at half that rate, probe actions
  are produced one at a time and timed until ``FeatureStore.get_online_features`` returns
  them (produce -> visible through Feast, one Feast read included; the wait is polled
  with a cheap direct read, so that the measuring does not starve the worker of CPU).
* ``loadavg_1m``: the machine's 1-minute load average before the drain and after the
  freshness probes (other jobs on the machine take CPU from the worker: compare runs only
  at similar load).
* ``store_appends_per_s``: the append alone (``append_batch`` of 500) in this process.
* ``feast_baseline``: the same appends done the only way Feast offers, read-modify-write
  (``get_online_features`` then ``write_to_online_store``, batches of 500), in this
  process on the same Redis: the ratio is ours over Feast's. (It also loses updates
  under concurrent writers, which tests/features/test_online_store.py shows ours does not.)
* ``reads``: 64 users x T items through Feast vs the direct fast path.
* ``items_per_s``: item ingestion (decode, frozen tokenizer, write) in this process.

The last line of output is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

N_CODES = 6
REPO_ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actions", type=int, default=20_000, help="backlog drained by the worker, per backend")
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--probes", type=int, default=100, help="freshness probes per backend")
    parser.add_argument("--stream-len", type=int, default=300)
    parser.add_argument("--within-ms", type=float, default=5.0, help="worker batch wait (as the worker's default)")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer dir for items_per_s (default: train a tiny one)"
    )
    parser.add_argument("--backends", default="redis,sqlite")


# ---- helpers -----------------------------------------------------------------------------


def _kafka():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import kafka
    return kafka


def _samples_end(consumer, tps) -> int:
    return int(sum(consumer.end_offsets(tps).values()))


def _seed_items(store, n_items: int) -> None:
    from features.online import ItemSids

    store.put_item_sids(
        [ItemSids(i, tuple(i * N_CODES + j for j in range(N_CODES)), "bench", 0) for i in range(n_items)]
    )


def _actions(n: int, users: int, items: int, tag: str, t0_ms: int = 1_700_000_000_000):
    from stream import records as rec

    rng = np.random.default_rng(0)
    us, its = rng.integers(users, size=n), rng.integers(items, size=n)
    return [rec.action_event(f"{tag}-{k}", int(us[k]), int(its[k]), 1 + k % 5, t0_ms + k) for k in range(n)]


def _start_worker(bootstrap: str, cfg, tag: str, within_ms: float, logdir: Path) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "hisam.jobs.stream_worker", "--bootstrap", bootstrap, "--backend", cfg.backend,
        "--repo-dir", str(cfg.repo_dir), "--stream-len", str(cfg.stream_len), "--n-codes", str(cfg.n_codes),
        "--app-id", f"bench-{tag}", "--instance-id", f"bench-{tag}", "--within-ms", str(within_ms),
    ]  # fmt: skip
    if cfg.redis_url:
        args += ["--redis-url", cfg.redis_url]
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return subprocess.Popen(
        args, cwd=REPO_ROOT, env=env, stdout=open(logdir / f"worker-{tag}.log", "w"), stderr=subprocess.STDOUT
    )


def _log_tail(logdir: Path, tag: str, n: int = 4000) -> str:
    """The end of a worker's log, for an error message (the log dir is temporary)."""
    path = logdir / f"worker-{tag}.log"
    return f"; worker log {path} ends:\n{path.read_text(errors='replace')[-n:]}" if path.exists() else ""


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# ---- the measurements ----------------------------------------------------------------------


def bench_store_appends(cfg, n: int, users: int, items: int) -> float:
    """Appends/s of ``append_batch`` (500 per call) in this process."""
    from features.online import StreamAction, open_stream_store

    store = open_stream_store(cfg)
    evs = _actions(n, users, items, tag=f"store-{cfg.backend}")
    acts = [
        StreamAction(
            e.user_id + 10_000_000,
            e.event_id,
            e.item_id,
            e.action,
            e.event_time_ms,
            tuple(range(e.item_id, e.item_id + N_CODES)),
        )
        for e in evs
    ]
    t0 = time.perf_counter()
    for s in range(0, n, 500):
        store.append_batch(acts[s : s + 500])
    rate = n / (time.perf_counter() - t0)
    store.close()
    return rate


def bench_feast_rmw(fs, n: int, users: int, items: int) -> float:
    """Appends/s done through Feast alone: read the streams, append in Python, write back."""
    import pandas as pd

    from features import encoding as enc

    evs = _actions(n, users, items, tag="feast")
    refs = [f"{enc.USER_STREAM_FV}:{f}" for f in enc.STREAM_FEATURES]
    t0 = time.perf_counter()
    for s in range(0, n, 500):
        batch = evs[s : s + 500]
        uids = sorted({e.user_id + 20_000_000 for e in batch})
        cur = fs.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in uids]).to_dict()
        state = {u: {f: list(cur[f][i] or []) for f in enc.STREAM_FEATURES} for i, u in enumerate(uids)}
        for e in batch:
            st = state[e.user_id + 20_000_000]
            st["sid_tokens"] = (st["sid_tokens"] + list(range(e.item_id, e.item_id + N_CODES)))[-300 * N_CODES :]
            st["actions"] = (st["actions"] + [e.action])[-300:]
            st["event_ids"] = (st["event_ids"] + [e.event_id])[-300:]
            st["event_times_ms"] = (st["event_times_ms"] + [e.event_time_ms])[-300:]
        ts = pd.Timestamp(time.time(), unit="s", tz="UTC")
        df = pd.DataFrame([{"user_id": u, **st, "event_timestamp": ts} for u, st in state.items()])
        fs.write_to_online_store(enc.USER_STREAM_FV, df)
    return n / (time.perf_counter() - t0)


def bench_reads(cfg, fs, n_users: int = 64, reps: int = 20) -> dict:
    """Latency of reading 64 full streams: Feast ``get_online_features`` vs the direct path."""
    from features.online import StreamAction, feast_read_streams, open_stream_store

    store = open_stream_store(cfg)
    base = 30_000_000
    acts = [
        StreamAction(base + u, f"read-{u}-{k}", k, 1, 1_700_000_000_000 + k, tuple(range(k, k + N_CODES)))
        for u in range(n_users)
        for k in range(cfg.stream_len)
    ]
    for s in range(0, len(acts), 1000):
        store.append_batch(acts[s : s + 1000], want_history=False)
    uids = [base + u for u in range(n_users)]
    feast_read_streams(fs, uids, N_CODES)
    store.read_streams(uids)  # warm both
    t0 = time.perf_counter()
    for _ in range(reps):
        feast_read_streams(fs, uids, N_CODES)
    feast_ms = (time.perf_counter() - t0) / reps * 1000
    t0 = time.perf_counter()
    for _ in range(reps):
        store.read_streams(uids)
    direct_ms = (time.perf_counter() - t0) / reps * 1000
    store.close()
    return {"feast_ms": feast_ms, "direct_ms": direct_ms, "speedup": feast_ms / direct_ms}


def bench_worker(cfg, fs, bootstrap: str, args: argparse.Namespace, logdir: Path) -> dict:
    """Backlog drain rate of one worker, then freshness at half that rate."""
    from features.online import feast_read_streams, open_stream_store
    from stream import producer as prod
    from stream import records as rec
    from stream import topics as tp

    kafka = _kafka()
    tp.ensure_topics(bootstrap, tp.default_topics(4))
    store = open_stream_store(cfg)
    _seed_items(store, args.items)
    producer = prod.make_producer(bootstrap, linger_ms=5)
    backlog = _actions(args.actions, args.users, args.items, tag=f"drain-{cfg.backend}")
    prod.produce_actions(producer, backlog)
    log.info("%s: %d actions queued; starting the worker", cfg.backend, len(backlog))

    watcher = kafka.KafkaConsumer(bootstrap_servers=bootstrap)
    sample_tps = [
        kafka.TopicPartition(tp.TRAINING_SAMPLES, p) for p in watcher.partitions_for_topic(tp.TRAINING_SAMPLES)
    ]
    load_before = os.getloadavg()[0]
    worker = _start_worker(bootstrap, cfg, cfg.backend, args.within_ms, logdir)
    try:
        t_first = None
        deadline = time.monotonic() + 300
        while True:
            done = _samples_end(watcher, sample_tps)
            now = time.perf_counter()
            if done > 0 and t_first is None:
                t_first, first_count = now, done
            if done >= len(backlog):
                t_last = now
                break
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker stopped or stalled at {done}/{len(backlog)}{_log_tail(logdir, cfg.backend)}"
                )
            time.sleep(0.01)
        rate = (len(backlog) - first_count) / max(t_last - t_first, 1e-9)
        log.info("%s: drained %d actions at %.0f/s", cfg.backend, len(backlog), rate)

        # Freshness at half the sustained rate: background load plus timed probes.
        stop = threading.Event()
        rng = np.random.default_rng(1)

        def load() -> None:
            p = prod.make_producer(bootstrap, linger_ms=5)
            start, k = time.perf_counter(), 0
            while not stop.is_set():
                ahead = start + k / (rate / 2) - time.perf_counter()
                if ahead > 0:
                    time.sleep(min(ahead, 0.01))
                    continue
                e = rec.action_event(
                    f"load-{cfg.backend}-{k}",
                    int(rng.integers(args.users)),
                    int(rng.integers(args.items)),
                    1 + k % 5,
                    1_800_000_000_000 + k,
                )
                p.send(tp.USER_ACTIONS, key=rec.user_key(e.user_id), value=e.SerializeToString())
                k += 1
            p.flush()
            p.close()

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        probe_producer = prod.make_producer(bootstrap, linger_ms=0)
        lat = []
        time.sleep(1.0)  # reach steady state
        for i in range(args.probes):
            user = 40_000_000 + i
            ev = rec.action_event(f"probe-{cfg.backend}-{i}", user, i % args.items, 2, 1_900_000_000_000 + i)
            t0 = time.perf_counter()
            probe_producer.send(tp.USER_ACTIONS, key=rec.user_key(user), value=ev.SerializeToString())
            probe_producer.flush()
            while True:
                # Poll the user's hash with one cheap direct read; the time is taken when a
                # Feast read then returns the probe. Polling Feast itself (5-10 ms of CPU per
                # read, back to back) would take a core from the worker under test on a small
                # machine: the old probe loop starved a 2-core worker below half its rate.
                (d,) = store.read_streams([user])
                if d is not None and ev.event_id in d.event_ids:
                    (s,) = feast_read_streams(fs, [user], N_CODES)
                    if s is not None and ev.event_id in s.event_ids:
                        break
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError(f"probe {ev.event_id} not visible after 30 s{_log_tail(logdir, cfg.backend)}")
                time.sleep(0.001)
            lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)
        load_after = os.getloadavg()[0]
        stop.set()
        loader.join()
        probe_producer.close()
    finally:
        worker.terminate()
        worker.wait(30)
        watcher.close()
        producer.close()
    # Exactly-once check on the drained backlog (a benchmark that lost data would lie).
    per_user: dict[int, int] = {}
    for e in backlog:
        per_user[e.user_id] = per_user.get(e.user_id, 0) + 1
    streams = store.read_streams(sorted(per_user))
    kept = sum(len(s) for s in streams if s)
    expected = sum(min(c, cfg.stream_len) for c in per_user.values())
    store.close()
    if kept < expected:
        raise RuntimeError(f"{cfg.backend}: only {kept} of {expected} stream items present after the drain")
    return {
        "actions_per_s": rate,
        "freshness_p50_ms": _percentile(lat, 50),
        "freshness_p99_ms": _percentile(lat, 99),
        "freshness_load_actions_per_s": rate / 2,
        "loadavg_1m": [load_before, load_after],
    }


def bench_items(cfg, tokenizer_dir: Path, n: int = 2_000) -> float:
    """Items/s through ItemProcessor (decode, frozen tokenizer, store write), batches of 500."""
    import torch

    from features.online import open_stream_store
    from models.tokenizer import FrozenTokenizer
    from models.tokenizer.testing import synthetic_items
    from stream import records as rec
    from stream.processing import ItemProcessor

    torch.set_num_threads(1)  # as in the stream worker (stream.app)
    tok = FrozenTokenizer.load(tokenizer_dir)
    feats, _, _ = synthetic_items(n, tok.modalities, seed=1)
    msgs = [
        rec.RawMessage(
            "item-events",
            0,
            i,
            None,
            rec.item_event(50_000_000 + i, {m: feats[m][i] for m in tok.modalities}, 5).SerializeToString(),
        )
        for i in range(n)
    ]
    store = open_stream_store(cfg)
    proc = ItemProcessor(store, tok)
    t0 = time.perf_counter()
    for s in range(0, n, 500):
        proc.process(msgs[s : s + 500])
    rate = n / (time.perf_counter() - t0)
    store.close()
    return rate


# ---- entry point ----------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    from features.online import OnlineStoreConfig, open_feature_store
    from hisam.services import kafka_broker, redis_server

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
            )
            for b in ("redis", "sqlite")
        }
        stores = {b: open_feature_store(cfgs[b]) for b in backends}  # Feast import + apply, once
        for b in backends:
            cfg = cfgs[b]
            log.info("%s: in-process append and read benchmarks", b)
            row = {"store_appends_per_s": bench_store_appends(cfg, min(args.actions, 10_000), args.users, args.items)}
            row["reads_64_users"] = bench_reads(cfg, stores[b])
            with kafka_broker() as broker:  # a fresh log per backend: its worker drains only its own backlog
                row.update(bench_worker(cfg, stores[b], broker.bootstrap, args, tmp))
            results[b] = row
        feast_fs = stores.get("redis") or open_feature_store(cfgs["redis"])
        n_feast = min(args.actions, 5_000)
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

            from models.tokenizer.testing import tiny_tokenizer

            tok_dir = tmp / "tokenizer"
            log.info("training a tiny tokenizer for the item benchmark (pass --tokenizer to use yours)")
            torch.set_num_threads(1)  # the worker runs the tokenizer on one thread too
            tiny_tokenizer(tok_dir, n_items=256, epochs=3)
        results["items_per_s"] = bench_items(cfgs["redis"], tok_dir)

    out = sys.stdout
    out.write(
        f"\n{'':18}{'actions/s':>12}{'fresh p50 ms':>14}{'fresh p99 ms':>14}{'append/s':>12}{'vs feast':>10}{'read feast/direct ms':>24}\n"
    )
    for b in backends:
        r = results[b]
        rd = r["reads_64_users"]
        out.write(
            f"{b:18}{r['actions_per_s']:>12.0f}{r['freshness_p50_ms']:>14.1f}{r['freshness_p99_ms']:>14.1f}"
            f"{r['store_appends_per_s']:>12.0f}{r['store_vs_feast']:>9.1f}x{rd['feast_ms']:>13.1f} / {rd['direct_ms']:.1f}\n"
        )
    out.write(
        f"{'feast_baseline':18}{'':>12}{'':>14}{'':>14}{results['feast_baseline']['actions_per_s']:>12.0f}{1.0:>9.1f}x\n"
    )
    out.write(f"items/s (tokenize + write): {results['items_per_s']:.0f}\n")
    out.write(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    from hisam.cli import run_standalone

    run_standalone("hisam bench stream", __doc__, add_arguments, main)
