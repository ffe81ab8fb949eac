"""What the loop measures while the replay runs: freshness, Rank as a front end calls it, progress.

Each measure runs beside the replay without slowing it: the freshness probe and the Rank
caller in threads of their own, the progress row from offsets, the probe's and the caller's
records and the trainer's files (no broker round trip beyond the offsets).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from hisam.run.state import STREAM_GROUP
from infra.kafka import Offsets
from serving.load import Request, percentile

log = logging.getLogger(__name__)


class FreshnessProbe:
    """Produce -> visible in the online store, for one replayed action in ``every``.

    Reads the user's stream directly (Feast's own bytes, as Rank reads them) until the
    action's event id is there. Runs in its own thread; ``submit`` is called by the replay.
    """

    def __init__(self, store, every: int, timeout_s: float = 10.0) -> None:
        self.store, self.every, self.timeout_s = store, every, timeout_s
        self.pending: deque[tuple[int, str, float]] = deque()
        self.latencies_ms: list[float] = []
        self.timeouts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="freshness-probe", daemon=True)

    def start(self) -> FreshnessProbe:
        self._thread.start()
        return self

    def submit(self, user_id: int, event_id: str, produced_at: float) -> None:
        self.pending.append((user_id, event_id, produced_at))

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.pending:
                time.sleep(0.002)
                continue
            user, event_id, t0 = self.pending[0]
            stream = self.store.read_streams([user])[0]
            now = time.perf_counter()
            if stream is not None and event_id in stream.event_ids[-64:]:
                self.latencies_ms.append((now - t0) * 1000)
                self.pending.popleft()
            elif now - t0 > self.timeout_s:
                self.timeouts += 1
                self.pending.popleft()
            else:
                time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class RecentUsers:
    """What a front end would ask Rank: a user just seen in the replay, random candidates.

    The replay calls ``seen`` for every action; the Rank caller (serving/load.py
    ``RankCaller``) calls the object for its next request.
    """

    def __init__(self, items: np.ndarray, candidates: int, seed: int = 0) -> None:
        self.items, self.k = items, candidates
        self.rng = random.Random(seed)
        self.recent: deque[int] = deque(maxlen=256)

    def seen(self, user: int) -> None:
        self.recent.append(user)

    def __call__(self) -> Request | None:
        if not self.recent:
            return None
        user = self.rng.choice(self.recent)
        picked = self.rng.sample(range(len(self.items)), min(self.k, len(self.items)))
        return user, [int(self.items[i]) for i in picked]


def last_users_requests(users: np.ndarray, items: np.ndarray, k: int, n: int = 3) -> list[Request]:
    """The replay's last ``n`` distinct users, each with the first ``k`` items: what a user sees answered."""
    last = list(dict.fromkeys(int(u) for u in users[::-1]))[:n]
    return [(u, [int(i) for i in items[:k]]) for u in last]


# --- progress -------------------------------------------------------------------------------------


def trainer_snapshot(state_dir: Path, repo: Path) -> dict:
    """The trainer's state and lineage as ``hisam trainer status`` reads them; {} while a snapshot is replaced."""
    from trainer.status import status

    try:
        return status(state_dir, repo, n_lineage=1000)
    except (OSError, ValueError, KeyError) as e:  # a snapshot being replaced under us: next tick
        log.debug("trainer status unavailable: %s", e)
        return {}


def progress_row(
    offsets: Offsets,
    probe: FreshnessProbe | None,
    rank_calls: list[dict],
    t: float,
    produced: int,
    total: int,
    state_dir: Path,
    repo: Path,
) -> dict:
    """One row of the timeline: ingest, freshness, Rank and the trainer ``t`` seconds into the replay."""
    from stream import topics as tp

    appended, lag = offsets.position(STREAM_GROUP, tp.USER_ACTIONS)
    dead = sum(offsets.end(tp.DEAD_LETTERS).values())
    fresh = probe.latencies_ms[-200:] if probe else []
    calls = rank_calls[-50:]
    ok = [c["ms"] for c in calls if c["ok"]]
    snap = trainer_snapshot(state_dir, repo)
    metrics = snap.get("window_metrics", {})
    lineage = snap.get("lineage", [])
    return {
        "t": round(t, 2),
        "produced": produced,
        "total": total,
        "appended": appended,
        "stream_lag": lag,
        "dead_letters": dead,
        "fresh_p50_ms": percentile(fresh, 50),
        "fresh_p99_ms": percentile(fresh, 99),
        "rank_calls": len(rank_calls),
        "rank_errors": sum(not c["ok"] for c in rank_calls),
        "rank_p50_ms": percentile(ok, 50),
        "rank_p99_ms": percentile(ok, 99),
        "rank_version": next((c["model_version"] for c in reversed(calls) if c["ok"]), ""),
        "trained": snap.get("trained", 0),
        "serving_version": snap.get("serving_version"),
        "published": sum(r.get("event") == "published" for r in lineage),
        "auc": {m: v.get("auc") for m, v in metrics.items()},
        "gauc": {m: v.get("gauc") for m, v in metrics.items()},
    }


def _fmt_ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.0f}"


def progress_line(row: dict, prev: dict | None) -> str:
    dt = row["t"] - (prev["t"] if prev else 0.0)
    rate = (row["appended"] - (prev["appended"] if prev else 0)) / dt if dt > 0 else 0.0
    auc = row["auc"]
    models = " / ".join(f"{m} {v:.3f}" for m, v in sorted(auc.items()) if v is not None and not math.isnan(v))
    return (
        f"replay {row['produced']:,}/{row['total']:,} | stream {row['appended']:,} appended ({rate:,.0f}/s), "
        f"lag {row['stream_lag']:,}, dead {row['dead_letters']}, fresh p50/p99 {_fmt_ms(row['fresh_p50_ms'])}/"
        f"{_fmt_ms(row['fresh_p99_ms'])} ms | trainer {row['trained']:,} samples, AUC {models or '-'}, "
        f"{row['published']} published, serving v{row['serving_version'] or '-'} | Rank {row['rank_calls']} calls, "
        f"p50/p99 {_fmt_ms(row['rank_p50_ms'])}/{_fmt_ms(row['rank_p99_ms'])} ms, {row['rank_errors']} errors, "
        f"answered by {row['rank_version'] or '-'}"
    )
