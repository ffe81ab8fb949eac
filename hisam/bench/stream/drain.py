"""The rate one stream worker sustains: the drain of a backlog, from users at the steady state
(``actions_per_s``) or with no stream yet (``actions_per_s_empty_streams``), checked exactly once."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from hisam.bench.stream.common import (
    STEADY_USER_BASE,
    CpuShares,
    actions,
    bench_topics,
    fill_streams,
    log_tail,
    seed_items,
    start_worker,
    stop_worker,
)
from infra.kafka import KafkaConsumer, TopicPartition

log = logging.getLogger(__name__)


def _samples_end(consumer, tps) -> int:
    return int(sum(consumer.end_offsets(tps).values()))


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


def bench_drain(
    cfg, bootstrap: str, args: argparse.Namespace, logdir: Path, steady: bool, pids: dict[str, int | None]
) -> dict:
    """The rate at which one worker drains a backlog, and a check that it appended it exactly once.

    ``steady``: the users start with full streams and seen windows (T items, W ids: the
    state every active user reaches), instead of none. The append script's work and the
    samples' size grow with the stream, so only that rate is one a worker sustains.
    ``pids``: the processes beside the worker (``common.service_pids``) whose CPU per action
    over the drain is reported with the worker's (``drain_cpu_us_per_action``).
    """
    from features.store import open_stream_store
    from stream import producer as prod
    from stream import topics as tp

    tag = f"{cfg.backend}-steady" if steady else cfg.backend
    user_base = STEADY_USER_BASE if steady else 0
    tp.ensure_topics(bootstrap, bench_topics(args))
    store = open_stream_store(cfg)
    seed_items(store, args.items)
    if steady:
        fill_streams(store, cfg, list(range(user_base, user_base + args.users)), args.items)
    producer = prod.make_producer(bootstrap, linger_ms=5)
    n_actions = args.steady_actions if steady else args.actions
    backlog = actions(n_actions, args.users, args.items, tag=f"drain-{tag}", user_base=user_base)
    prod.produce_actions(producer, backlog)
    log.info("%s: %d actions queued; starting the worker", tag, len(backlog))

    watcher = KafkaConsumer(bootstrap_servers=bootstrap)
    sample_tps = [TopicPartition(tp.TRAINING_SAMPLES, p) for p in watcher.partitions_for_topic(tp.TRAINING_SAMPLES)]
    load_before = os.getloadavg()[0]
    worker = start_worker(bootstrap, cfg, tag, args.within_ms, logdir, args.batch_size)
    cpu = CpuShares({"worker": worker.pid, **pids})
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
                raise RuntimeError(f"worker stopped or stalled at {done}/{len(backlog)}{log_tail(logdir, tag)}")
            time.sleep(0.01)
        rate = (len(backlog) - first_count) / max(t_last - t_first, 1e-9)
        log.info("%s: drained %d actions at %.0f/s", tag, len(backlog), rate)
        # Exactly-once check on the drained backlog (a benchmark that lost data would lie).
        _check_tails(store, backlog, cfg.stream_len)
    finally:
        stop_worker(worker)
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
