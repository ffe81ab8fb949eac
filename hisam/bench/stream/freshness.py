"""Freshness: produce -> visible through Feast, for probe actions sent while a worker is loaded."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import time
import warnings
from pathlib import Path

import numpy as np

from hisam.bench.stream.common import (
    N_CODES,
    STEADY_USER_BASE,
    CpuShares,
    bench_topics,
    log_tail,
    start_worker,
    stop_worker,
)
from serving.load import percentile

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 30.0
LOAD_PREBUILT_S = 60.0  # seconds of the freshness load serialised before it starts


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
    tp.ensure_topics(bootstrap, bench_topics(args))
    store = open_stream_store(cfg)
    probe_producer = prod.make_producer(bootstrap, linger_ms=0)
    worker = start_worker(bootstrap, cfg, tag, args.within_ms, logdir, args.batch_size)
    loader = None
    try:

        def probe(i: int, timeout_s: float) -> float:
            """Send one probe action; ms until a Feast read returns it (> timeout: not seen)."""
            user = user_base + 40_000_000 + i
            # Event times near the worker's clock: it refuses times too far ahead (stream.records.EventTimeBounds).
            ev = rec.action_event(f"probe-{tag}-{i}", user, i % args.items, 2, int(time.time() * 1000))
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
            raise RuntimeError(f"the freshness worker did not start{log_tail(logdir, tag)}")
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
        cpu = CpuShares({"worker": worker.pid, **pids, "load_producer": loader.pid, "probes": os.getpid()})
        cpu.start()
        lat = []
        for i in range(args.probes):
            lat.append(probe(i, PROBE_TIMEOUT_S))
            log.debug("probe %d: %.1f ms", i, lat[-1])
            if lat[-1] > PROBE_TIMEOUT_S * 1000:
                log.warning("probe %d not visible after %.0f s", i, PROBE_TIMEOUT_S)
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker stopped{log_tail(logdir, tag)}")
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
        stop_worker(worker)
        probe_producer.close()
        store.close()
    return {
        "freshness_p50_ms": percentile(lat, 50),
        "freshness_p90_ms": percentile(lat, 90),
        "freshness_p99_ms": percentile(lat, 99),
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

    from infra.kafka_security import active
    from stream import records as rec
    from stream import topics as tp
    from stream.app import RecordSender

    logging.disable(logging.INFO)

    async def run() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, **active().aiokafka_kwargs()
        )
        await producer.start()
        try:
            await producer.partitions_for(tp.USER_ACTIONS)  # the topic's metadata, before the first send
            sender = RecordSender(lambda: producer)
            keys = [rec.user_key(user_base + u) for u in range(users)]
            rng = np.random.default_rng(1)

            t0_ms = int(time.time() * 1000) - 3_600_000  # an hour back, one ms per action: never ahead of the clock

            def event(k: int, u: int, i: int) -> bytes:
                return rec.action_event(f"load-{tag}-{k}", user_base + u, i, 1 + k % 5, t0_ms + k).SerializeToString()

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
