"""What the stream measurements share: synthetic items and actions, the steady state, the
worker as a process of its own, and the CPU each process uses meanwhile."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

N_CODES = 6
REPO_ROOT = Path(__file__).resolve().parents[3]
STEADY_USER_BASE = 60_000_000  # the steady-state users' ids (the empty-stream run's are 0 ..)


def seed_items(store, n_items: int) -> None:
    from features.store import ItemSids

    store.put_item_sids(
        [ItemSids(i, tuple(i * N_CODES + j for j in range(N_CODES)), "bench", 0) for i in range(n_items)]
    )


def actions(n: int, users: int, items: int, tag: str, t0_ms: int = 1_700_000_000_000, user_base: int = 0):
    from stream import records as rec

    rng = np.random.default_rng(0)
    us, its = rng.integers(users, size=n) + user_base, rng.integers(items, size=n)
    return [rec.action_event(f"{tag}-{k}", int(us[k]), int(its[k]), 1 + k % 5, t0_ms + k) for k in range(n)]


def fill_streams(store, cfg, user_ids: list[int], items: int) -> None:
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
                tokens=item[:, None] * N_CODES + np.arange(N_CODES),  # (T, N_CODES), as seed_items
                actions=1 + k % 5,
                event_ids=ids[-T:],
                event_times_ms=1_600_000_000_000 + k,
            )
            states.append(UserState(stream, ids, W, 1_600_000_000_000 + T))
        store.write_user_states(states)


def bench_topics(args: argparse.Namespace):
    """The topics of a bench broker: hisam's own, training-samples kept ``--samples-retention-ms``."""
    from stream import topics as tp

    return tp.default_topics(4, args.samples_retention_ms or None)


# ---- the worker, a process of its own ------------------------------------------------------------


def start_worker(
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


def stop_worker(worker: subprocess.Popen) -> None:
    worker.terminate()
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:  # a worker whose broker is gone may hang in its shutdown
        worker.kill()
        worker.wait()


def log_tail(logdir: Path, tag: str, n: int = 4000) -> str:
    """The end of a worker's log, for an error message (the log dir is temporary)."""
    path = logdir / f"worker-{tag}.log"
    return f"; worker log {path} ends:\n{path.read_text(errors='replace')[-n:]}" if path.exists() else ""


# ---- CPU accounting ------------------------------------------------------------------------------


def service_pids(broker, redis, backend: str) -> dict[str, int | None]:
    """The processes beside the worker whose CPU the bench reports: the broker, and Redis
    when it is the worker's store."""
    return {"broker": broker.pid, **({"redis": redis.pid} if backend == "redis" else {})}


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc; None where unreadable)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuShares:
    """Cores each named process used between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int | None]):
        self.pids = pids

    def start(self) -> None:
        self.t0, self.c0 = time.perf_counter(), {k: cpu_seconds(p) for k, p in self.pids.items()}

    def stop(self) -> dict[str, float]:
        span = time.perf_counter() - self.t0
        out = {}
        for k, p in self.pids.items():
            c1 = cpu_seconds(p)
            if c1 is not None and self.c0[k] is not None:
                out[k] = round((c1 - self.c0[k]) / span, 3)
        return out
