"""Prequential (test-then-train) evaluation: every event is scored before any model trains on it.

Each micro-batch is first scored by the models being compared, and only then trained on,
so every score in the windows is an out-of-sample prediction (Dawid's prequential
principle; the near-line equivalent of docs/method.md §5's chronological split). The models:

- ``serving``: the weights Triton serves now (the last published version);
- ``candidate``: the trainer's weights, updated after every micro-batch;
- ``frozen``: the warm-start weights, never updated (the baseline of the near-line figure);
- ``parent``: only while a freshly published version is on probation, the version it
  replaced (automatic rollback compares the two).

A ``Window`` keeps the last ``size`` events as (user, label, one score per model) and gives
AUC and GAUC per model over them (``recipes.ranker.evaluate``: GAUC weights users by their
impressions and skips one-class users). Rows are aligned: every model scored the same events.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping

import numpy as np

from recipes.ranker.evaluate import auc, gauc


class Window:
    """The last ``size`` prequential rows; ``models`` names the score columns."""

    def __init__(self, models: Iterable[str], size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be positive, got {size}")
        self.models = tuple(models)
        self.size = size
        self.rows: deque[tuple] = deque(maxlen=size)  # (user, label, *scores in self.models order)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, users: np.ndarray, labels: np.ndarray, scores: Mapping[str, np.ndarray]) -> None:
        cols = [np.asarray(scores[m], dtype=np.float64) for m in self.models]
        for i in range(len(users)):
            self.rows.append((int(users[i]), int(labels[i]), *(float(c[i]) for c in cols)))

    def clear(self) -> None:
        self.rows.clear()

    def arrays(self, last: int | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        rows = list(self.rows)[-last:] if last else list(self.rows)
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), {m: np.zeros(0) for m in self.models}
        a = np.asarray(rows, dtype=np.float64)  # (R, 2 + models)
        return a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), {m: a[:, 2 + k] for k, m in enumerate(self.models)}

    def metrics(self, last: int | None = None) -> dict[str, dict[str, float]]:
        """model -> {auc, gauc} over the window (or its last ``last`` rows); NaN where undefined."""
        users, labels, scores = self.arrays(last)
        return {m: metrics_of(users, labels, s) for m, s in scores.items()}

    def to_dict(self) -> dict:
        return {"models": list(self.models), "size": self.size, "rows": [list(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Window:
        w = cls(d["models"], d["size"])
        w.rows.extend(tuple(r) for r in d["rows"])
        return w


def metrics_of(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUC and GAUC; NaN when a class is missing or a score is not finite (never raises on data)."""
    if len(scores) == 0 or not np.isfinite(scores).all():
        return {"auc": math.nan, "gauc": math.nan, "n": len(scores)}
    return {"auc": auc(labels, scores), "gauc": gauc(users, labels, scores), "n": len(scores)}
