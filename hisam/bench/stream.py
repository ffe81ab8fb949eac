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
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from infra.kafka import KafkaConsumer, TopicPartition

log = logging.getLogger(__name__)

N_CODES = 6
PROBE_TIMEOUT_S = 30.0
LOAD_PREBUILT_S = 60.0  # seconds of the freshness load serialised before it starts
REPO_ROOT = Path(__file__).resolve().parents[2]


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


# ---- helpers -----------------------------------------------------------------------------


def _samples_end(consumer, tps) -> int:
    return int(sum(consumer.end_offsets(tps).values()))


def _seed_items(store, n_items: int) -> None:
    from features.store import ItemSids

    store.put_item_sids(
        [ItemSids(i, tuple(i * N_CODES + j for j in range(N_CODES)), "bench", 0) for i in range(n_items)]
    )


def _actions(n: int, users: int, items: int, tag: str, t0_ms: int = 1_700_000_000_000, user_base: int = 0):
    from stream import records as rec

    rng = np.random.default_rng(0)
    us, its = rng.integers(users, size=n) + user_base, rng.integers(items, size=n)
    return [rec.action_event(f"{tag}-{k}", int(us[k]), int(its[k]), 1 + k % 5, t0_ms + k) for k in range(n)]


def _fill_streams(store, cfg, user_ids: list[int], items: int) -> None:
    """Give each user a full stream (T items) and a full seen window (W ids): the steady state."""
    from features.store import UserState, UserStream

    T, W = cfg.stream_len, cfg.seen_window
    k = np.arange(T)
    for start in range(0, len(user_ids), 100):
        states = []
        for u in user_ids[start : start + 100]:
            item = (u + k) % items
            ids = [f"fill-{u}-{j}" for j in range(W)]
            stream = UserStream(
                user_id=u,
                tokens=item[:, None] * N_CODES + np.arange(N_CODES),  # (T, N_CODES), as _seed_items
                actions=1 + k % 5,
                event_ids=ids[-T:],
                event_times_ms=1_600_000_000_000 + k,
            )
            states.append(UserState(stream, ids, W, 1_600_000_000_000 + T))
        store.write_user_states(states)


def _check_tails(store, backlog, stream_len: int) -> None:
    """Exactly once, in order: each user's stream ends with that user's backlog events."""
    by_user: dict[int, list[str]] = {}
    for e in backlog:
        by_user.setdefault(e.user_id, []).append(e.event_id)
    users = sorted(by_user)
    for u, s in zip(users, store.read_streams(users)):
        want = by_user[u][-stream_len:]
        if s is None or s.event_ids[-len(want) :] != want:
            got = None if s is None else s.event_ids[-len(want) :]
            raise RuntimeError(f"user {u}: the stream ends with {got}, not its backlog {want}")


def _start_worker(
    bootstrap: str, cfg, tag: str, within_ms: float, logdir: Path, batch_size: int | None = None
) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "hisam.jobs.stream_worker", "--bootstrap", bootstrap, "--backend", cfg.backend,
        "--repo-dir", str(cfg.repo_dir), "--stream-len", str(cfg.stream_len), "--n-codes", str(cfg.n_codes),
        "--seen-window", str(cfg.seen_window), "--app-id", f"bench-{tag}", "--instance-id", f"bench-{tag}",
        "--within-ms", str(within_ms),
    ]  # fmt: skip
    if batch_size:
        args += ["--batch-size", str(batch_size)]
    if cfg.redis_url:
        args += ["--redis-url", cfg.redis_url]
    from infra.supervisor import child_environ

    env = child_environ({"PYTHONWARNINGS": "ignore::DeprecationWarning"})
    return subprocess.Popen(
        args, cwd=REPO_ROOT, env=env, stdout=open(logdir / f"worker-{tag}.log", "w"), stderr=subprocess.STDOUT
    )


def _log_tail(logdir: Path, tag: str, n: int = 4000) -> str:
    """The end of a worker's log, for an error message (the log dir is temporary)."""
    path = logdir / f"worker-{tag}.log"
    return f"; worker log {path} ends:\n{path.read_text(errors='replace')[-n:]}" if path.exists() else ""


def _bench_topics(args: argparse.Namespace):
    """The topics of a bench broker: hisam's own, training-samples kept ``--samples-retention-ms``."""
    from stream import topics as tp

    return tp.default_topics(4, args.samples_retention_ms or None)


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc; None where unreadable)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuShares:
    """Cores each named process used between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int | None]):
        self.pids = pids

    def start(self) -> None:
        self.t0, self.c0 = time.perf_counter(), {k: _cpu_seconds(p) for k, p in self.pids.items()}

    def stop(self) -> dict[str, float]:
        span = time.perf_counter() - self.t0
        out = {}
        for k, p in self.pids.items():
            c1 = _cpu_seconds(p)
            if c1 is not None and self.c0[k] is not None:
                out[k] = round((c1 - self.c0[k]) / span, 3)
        return out


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# ---- the measurements ----------------------------------------------------------------------


def bench_store_appends(cfg, n: int, users: int, items: int) -> float:
    """Appends/s of ``append_batch`` (500 per call) in this process."""
    from features.store import StreamAction, open_stream_store

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
    from features.store import StreamAction, feast_read_streams, open_stream_store

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


STEADY_USER_BASE = 60_000_000  # the steady-state users' ids (the empty-stream run's are 0 ..)


def _stop_worker(worker: subprocess.Popen) -> None:
    worker.terminate()
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:  # a worker whose broker is gone may hang in its shutdown
        worker.kill()
        worker.wait()


def bench_drain(
    cfg, bootstrap: str, args: argparse.Namespace, logdir: Path, steady: bool, pids: dict[str, int | None]
) -> dict:
    """The rate at which one worker drains a backlog, and a check that it appended it exactly once.

    ``steady``: the users start with full streams and seen windows (T items, W ids: the
    state every active user reaches), instead of none. The append script's work and the
    samples' size grow with the stream, so only that rate is one a worker sustains.
    ``pids``: the processes beside the worker (``_service_pids``) whose CPU per action over
    the drain is reported with the worker's (``drain_cpu_us_per_action``).
    """
    from features.store import open_stream_store
    from stream import producer as prod
    from stream import topics as tp

    tag = f"{cfg.backend}-steady" if steady else cfg.backend
    user_base = STEADY_USER_BASE if steady else 0
    tp.ensure_topics(bootstrap, _bench_topics(args))
    store = open_stream_store(cfg)
    _seed_items(store, args.items)
    if steady:
        _fill_streams(store, cfg, list(range(user_base, user_base + args.users)), args.items)
    producer = prod.make_producer(bootstrap, linger_ms=5)
    n_actions = args.steady_actions if steady else args.actions
    backlog = _actions(n_actions, args.users, args.items, tag=f"drain-{tag}", user_base=user_base)
    prod.produce_actions(producer, backlog)
    log.info("%s: %d actions queued; starting the worker", tag, len(backlog))

    watcher = KafkaConsumer(bootstrap_servers=bootstrap)
    sample_tps = [TopicPartition(tp.TRAINING_SAMPLES, p) for p in watcher.partitions_for_topic(tp.TRAINING_SAMPLES)]
    load_before = os.getloadavg()[0]
    worker = _start_worker(bootstrap, cfg, tag, args.within_ms, logdir, args.batch_size)
    cpu = _CpuShares({"worker": worker.pid, **pids})
    try:
        t_first = None
        deadline = time.monotonic() + 300
        while True:
            done = _samples_end(watcher, sample_tps)
            now = time.perf_counter()
            if done > 0 and t_first is None:
                t_first, first_count = now, done
                cpu.start()
            if done >= len(backlog):
                t_last = now
                cores = cpu.stop()
                break
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker stopped or stalled at {done}/{len(backlog)}{_log_tail(logdir, tag)}")
            time.sleep(0.01)
        rate = (len(backlog) - first_count) / max(t_last - t_first, 1e-9)
        log.info("%s: drained %d actions at %.0f/s", tag, len(backlog), rate)
        # Exactly-once check on the drained backlog (a benchmark that lost data would lie).
        _check_tails(store, backlog, cfg.stream_len)
    finally:
        _stop_worker(worker)
        watcher.close()
        producer.close()
        store.close()
    # CPU time per action of each process over the drain (cores x time / actions): on a
    # 2-core machine their sum bounds the rate (2 s of CPU per second in all).
    per_action = {k: round(c / rate * 1e6, 1) for k, c in cores.items()}
    out = {
        "actions_per_s": rate,
        "loadavg_1m": [load_before, os.getloadavg()[0]],
        "drain_cpu_us_per_action": per_action,
    }
    if "redis" in per_action:
        out["redis_cpu_us_per_action"] = per_action["redis"]
    return out


def _service_pids(broker, redis, backend: str) -> dict[str, int | None]:
    """The processes beside the worker whose CPU the bench reports: the broker, and Redis
    when it is the worker's store."""
    return {"broker": broker.pid, **({"redis": redis.pid} if backend == "redis" else {})}


def bench_freshness(
    cfg, fs, bootstrap: str, args: argparse.Namespace, logdir: Path, rate: float, pids: dict[str, int | None]
) -> dict:
    """Produce -> visible through Feast, for probes sent while a worker is loaded at ``rate``.

    The load goes to the steady-state users (``bench_drain(steady=True)`` left them there),
    from another process. On a broker of its own: the embedded broker rewrites all it holds
    about once a second, at a CPU cost that grows with it (0.2 core with 80 MB, 0.7 with 160
    MB), and the drain left ~80 MB of samples in the drain's broker. ``freshness_cpu_cores``:
    what each process (worker, ``pids``: the broker and Redis, load producer, this one's
    probes) used meanwhile.
    """
    from features.store import feast_read_streams, open_stream_store
    from stream import producer as prod
    from stream import records as rec
    from stream import topics as tp

    tag = f"{cfg.backend}-fresh"
    user_base = STEADY_USER_BASE
    tp.ensure_topics(bootstrap, _bench_topics(args))
    store = open_stream_store(cfg)
    probe_producer = prod.make_producer(bootstrap, linger_ms=0)
    worker = _start_worker(bootstrap, cfg, tag, args.within_ms, logdir, args.batch_size)
    loader = None
    try:

        def probe(i: int, timeout_s: float) -> float:
            """Send one probe action; ms until a Feast read returns it (> timeout: not seen)."""
            user = user_base + 40_000_000 + i
            ev = rec.action_event(f"probe-{tag}-{i}", user, i % args.items, 2, 1_900_000_000_000 + i)
            t0 = time.perf_counter()
            probe_producer.send(tp.USER_ACTIONS, key=rec.user_key(user), value=ev.SerializeToString())
            probe_producer.flush()
            while time.perf_counter() - t0 <= timeout_s:
                # Poll the user's hash with one cheap direct read; the time is taken when a
                # Feast read then returns the probe. Polling Feast itself (5-10 ms of CPU per
                # read, back to back) would take a core from the worker under test on a small
                # machine: the old probe loop starved a 2-core worker below half its rate.
                (d,) = store.read_streams([user])
                if d is not None and ev.event_id in d.event_ids:
                    (s,) = feast_read_streams(fs, [user], N_CODES)
                    if s is not None and ev.event_id in s.event_ids:
                        break
                time.sleep(0.001)
            return (time.perf_counter() - t0) * 1000

        if probe(-1, 120) > 120_000:  # the worker is up and consuming
            raise RuntimeError(f"the freshness worker did not start{_log_tail(logdir, tag)}")
        ctx = multiprocessing.get_context("spawn")
        started, stop = ctx.Event(), ctx.Event()
        loader = ctx.Process(
            target=_produce_load,
            args=(bootstrap, rate, args.users, args.items, tag, started, stop, user_base),
            daemon=True,
        )
        loader.start()
        if not started.wait(60):
            raise RuntimeError("the load producer did not start")
        load_before = os.getloadavg()[0]
        time.sleep(1.0)  # reach steady state
        cpu = _CpuShares({"worker": worker.pid, **pids, "load_producer": loader.pid, "probes": os.getpid()})
        cpu.start()
        lat = []
        for i in range(args.probes):
            lat.append(probe(i, PROBE_TIMEOUT_S))
            log.debug("probe %d: %.1f ms", i, lat[-1])
            if lat[-1] > PROBE_TIMEOUT_S * 1000:
                log.warning("probe %d not visible after %.0f s", i, PROBE_TIMEOUT_S)
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker stopped{_log_tail(logdir, tag)}")
                if sum(x > PROBE_TIMEOUT_S * 1000 for x in lat) >= 3:
                    break  # the worker does not keep up: the figures already say so
            time.sleep(0.05)
        load_after = os.getloadavg()[0]
        cores = cpu.stop()
        stop.set()
        loader.join(30)
    finally:
        if loader is not None and loader.is_alive():
            loader.kill()
        _stop_worker(worker)
        probe_producer.close()
        store.close()
    return {
        "freshness_p50_ms": _percentile(lat, 50),
        "freshness_p90_ms": _percentile(lat, 90),
        "freshness_p99_ms": _percentile(lat, 99),
        "freshness_max_ms": max(lat, default=float("nan")),
        "freshness_probes": len(lat),
        "freshness_timeouts": sum(x > PROBE_TIMEOUT_S * 1000 for x in lat),
        "freshness_load_actions_per_s": rate,
        "loadavg_1m_freshness": [load_before, load_after],
        # Cores each process used while probing (2 in all here): the worker shares them.
        "freshness_cpu_cores": cores,
        "samples_retention_ms": args.samples_retention_ms or None,
    }


def _produce_load(
    bootstrap: str, rate: float, users: int, items: int, tag: str, started, stop, user_base: int = 0
) -> None:  # pragma: no cover - runs in a child process
    """The freshness benchmark's background load: random users' actions at ``rate``/s until ``stop``.

    Sent as the worker sends its samples (``stream.app.RecordSender``): aiokafka record
    batches, one per partition every ~5 ms, each key on the partition a keyed send would
    pick: a few us of Python per action where a keyed send is ~16, CPU that the machine's
    two cores would otherwise take from the system measured.
    The first ``LOAD_PREBUILT_S`` seconds of events are serialised before ``started`` is
    set (building an event costs about as much again as sending it); later ones as they go.
    """
    import asyncio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from aiokafka import AIOKafkaProducer

    from stream import records as rec
    from stream import topics as tp
    from stream.app import RecordSender

    logging.disable(logging.INFO)

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
        await producer.start()
        try:
            await producer.partitions_for(tp.USER_ACTIONS)  # the topic's metadata, before the first send
            sender = RecordSender(lambda: producer)
            keys = [rec.user_key(user_base + u) for u in range(users)]
            rng = np.random.default_rng(1)

            def event(k: int, u: int, i: int) -> bytes:
                return rec.action_event(
                    f"load-{tag}-{k}", user_base + u, i, 1 + k % 5, 1_800_000_000_000 + k
                ).SerializeToString()

            n_pre = int(rate * LOAD_PREBUILT_S)
            pre_u, pre_i = rng.integers(users, size=n_pre).tolist(), rng.integers(items, size=n_pre).tolist()
            prebuilt = [event(k, u, i) for k, (u, i) in enumerate(zip(pre_u, pre_i))]
            start, k, pending = time.perf_counter(), 0, []
            tick = max(1, int(rate * 0.005))  # send every ~5 ms: a send has a fixed cost
            started.set()
            while not stop.is_set():
                due = int((time.perf_counter() - start) * rate) - k
                if due < tick:
                    await asyncio.sleep(0.002)
                    continue
                due = min(due, 2000)
                records = []
                for _ in range(due):
                    if k < n_pre:
                        u, value = pre_u[k], prebuilt[k]
                    else:
                        u, i = int(rng.integers(users)), int(rng.integers(items))
                        value = event(k, u, i)
                    records.append((keys[u], value))
                    k += 1
                pending += await sender.send(tp.USER_ACTIONS, records)
                if len(pending) > 1000:
                    await asyncio.gather(*pending)
                    pending.clear()
                await asyncio.sleep(0)
            await asyncio.gather(*pending)
        finally:
            await producer.stop()

    asyncio.run(run())


def bench_items(cfg, tokenizer_dir: Path, n: int = 2_000) -> float:
    """Items/s through ItemProcessor (decode, frozen tokenizer, store write), batches of 500."""
    import torch

    from features.store import open_stream_store
    from models.tokenizer import FrozenTokenizer
    from recipes.tokenizer.testing import synthetic_items
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
                    empty = bench_drain(cfg, broker.bootstrap, args, tmp, False, _service_pids(broker, redis, b))
                row["actions_per_s_empty_streams"] = empty["actions_per_s"]
                if "redis_cpu_us_per_action" in empty:
                    row["redis_cpu_us_per_action_empty_streams"] = empty["redis_cpu_us_per_action"]
                row["loadavg_1m_empty_streams"] = empty["loadavg_1m"]
            with kafka_broker() as broker:
                row.update(bench_drain(cfg, broker.bootstrap, args, tmp, True, _service_pids(broker, redis, b)))
            if args.probes:
                with kafka_broker() as broker:
                    rate = args.freshness_rate or row["actions_per_s"] / 2
                    pids = _service_pids(broker, redis, b)
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
    return 0


if __name__ == "__main__":
    from hisam.cli import run_standalone

    run_standalone("hisam bench stream", __doc__, add_arguments, main)
