"""Paired comparison of two scorers on the same prequential events: the gate's statistics.

The gate asks whether the candidate ranks at least as well as the serving model. Both
scored the *same* events before either trained on them (prequential.py), so the question
is about the paired difference D = AUC(candidate) - AUC(serving) on one window, not about
two independent AUCs: most of the noise of a 2,000-event window (which users and items
happen to be in it) is shared by the two models and cancels in D. Comparing the two point
estimates instead, as the first gate did, publishes on noise whenever the models are close.

Two estimates of D's sampling distribution:

- ``bootstrap`` (the default): resample the window B times and recompute both AUCs on
  every resample with the *same* weights (paired). The unit resampled is the user by
  default (a cluster bootstrap): a user's events in a window are not independent (ML-100K
  users rate dozens of films in one session; a 2,000-event window holds ~40 users), and
  resampling events would treat them as if they were, giving intervals that are too narrow
  (tests/trainer/test_trainer_gate.py shows the false-pass rate). ``unit="event"`` resamples
  events. The bound is the percentile bound: lower = the (1 - confidence) quantile of D*.
- ``delong``: DeLong, DeLong & Clarke-Pearson (Biometrics 1988) variance of the paired
  AUC difference from the per-positive and per-negative placement values, with a normal
  bound; deterministic and O(n log n), events treated as independent (the same caveat as
  ``unit="event"``). The tests use it as an independent oracle of the event bootstrap.

AUC with weights (``weighted_auc``): a resample is a vector of multiplicities w_i; its AUC
is sum_{i pos, j neg} w_i w_j [s_i > s_j] (ties count 1/2) / (W_pos W_neg), which is the
AUC of the resample written out row by row. It is computed for all B resamples at once:
sort the scores once, sum the weights of each tie group per class (``np.add.reduceat``),
and accumulate the negative weight below each group (``cumsum``): O(B n) per chunk of
resamples, no Python loop over rows.

Letters: n events in the window, B resamples, G distinct score values, U users.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

Method = Literal["bootstrap", "delong"]
Unit = Literal["user", "event"]
METHODS: tuple[str, ...] = ("bootstrap", "delong")
UNITS: tuple[str, ...] = ("user", "event")
_BLOCK = 500_000  # elements per (resamples, n) float64 array: a few MB, whatever the window


@dataclass(frozen=True)
class PairedTest:
    """D = AUC(a) - AUC(b) on one set of events, with its bounds at ``confidence``.

    ``lower`` and ``upper`` are one-sided bounds at ``confidence`` each (D >= lower with
    that confidence: the gate reads it; D <= upper: probation reads it), together a
    two-sided interval at 2 * confidence - 1. NaN fields: AUC undefined (a class is missing).
    """

    method: str
    unit: str
    n: int
    users: int
    positives: int
    negatives: int
    auc_a: float
    auc_b: float
    diff: float
    se: float
    lower: float
    upper: float
    confidence: float
    resamples: int  # bootstrap resamples used (0 for DeLong); resamples missing a class are dropped

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _tie_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order that sorts ``scores`` ascending, start index of each run of equal sorted scores)."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.concatenate(([0], np.flatnonzero(s[1:] != s[:-1]) + 1))  # (G,)
    return order, starts


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of ``scores`` under each row of ``weights`` (B, n) -> (B,); NaN where a class has no weight."""
    return _SortedScores(labels, scores).auc(np.atleast_2d(np.asarray(weights, dtype=np.float64)))


class _SortedScores:
    """One scorer's events sorted once, so that every resample's AUC is a few vectorised passes."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray) -> None:
        self.order, self.starts = _tie_groups(np.asarray(scores, dtype=np.float64))
        self.positive = np.asarray(labels).astype(bool)[self.order]  # (n,) in score order

    def auc(self, weights: np.ndarray) -> np.ndarray:
        """(B, n) weights in event order -> (B,) AUC."""
        ws = weights[:, self.order]  # (B, n) in score order
        pos, neg = np.where(self.positive, ws, 0.0), np.where(self.positive, 0.0, ws)  # (B, n)
        if len(self.starts) < ws.shape[1]:  # ties: sum each run of equal scores (model scores rarely tie)
            pos = np.add.reduceat(pos, self.starts, axis=1)  # (B, G)
            neg = np.add.reduceat(neg, self.starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each group
        num = (pos * (below + 0.5 * neg)).sum(axis=1)
        den = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _undefined(method: str, unit: str, labels: np.ndarray, users: int, confidence: float) -> PairedTest:
    pos = int(labels.sum())
    nan = math.nan
    return PairedTest(
        method, unit, len(labels), users, pos, len(labels) - pos, nan, nan, nan, nan, nan, nan, confidence, 0
    )


def paired_bootstrap(
    labels: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    users: np.ndarray | None = None,
    *,
    unit: Unit = "user",
    confidence: float = 0.9,
    resamples: int = 1000,
    seed: int = 0,
) -> PairedTest:
    """Paired (cluster) bootstrap of AUC(a) - AUC(b) (module docstring); deterministic given ``seed``."""
    labels = np.asarray(labels).astype(np.int64)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} is not one of {UNITS}")
    if unit == "user" and users is None:
        raise ValueError("a user-level bootstrap needs the users of the events")
    if unit == "user":
        distinct, groups = np.unique(np.asarray(users), return_inverse=True)
        n_users = len(distinct)
    else:
        groups = np.arange(len(labels))
        n_users = len(np.unique(users)) if users is not None else 0
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if labels.min(initial=1) == labels.max(initial=0) or n_groups < 2:  # no AUC, or no spread to resample
        return _undefined("bootstrap", unit, labels, n_users, confidence)
    sa, sb = _SortedScores(labels, a), _SortedScores(labels, b)  # each scorer sorted once, for all resamples
    one = np.ones((1, len(labels)))
    auc_a, auc_b = float(sa.auc(one)[0]), float(sb.auc(one)[0])
    rng = np.random.default_rng(seed)
    diffs = []
    chunk = max(1, _BLOCK // max(1, len(labels)))  # resamples per vectorised block
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        drawn = rng.integers(0, n_groups, size=(size, n_groups))  # (B', U) groups drawn with replacement
        flat = (drawn + n_groups * np.arange(size)[:, None]).ravel()
        counts = np.bincount(flat, minlength=size * n_groups).reshape(size, n_groups)  # (B', U) multiplicities
        w = counts[:, groups].astype(np.float64)  # (B', n): each event weighs its group's multiplicity
        diffs.append(sa.auc(w) - sb.auc(w))
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]  # a resample that drew one class only has no AUC
    if d.size == 0:
        return _undefined("bootstrap", unit, labels, n_users, confidence)
    lo, hi = np.quantile(d, [1.0 - confidence, confidence])
    pos = int(labels.sum())
    return PairedTest(
        "bootstrap",
        unit,
        len(labels),
        n_users,
        pos,
        len(labels) - pos,
        auc_a,
        auc_b,
        auc_a - auc_b,
        float(d.std(ddof=1)) if d.size > 1 else 0.0,
        float(lo),
        float(hi),
        confidence,
        int(d.size),
    )


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order, starts = _tie_groups(x)
    ends = np.concatenate((starts[1:], [len(x)]))
    mid = (starts + ends + 1) / 2.0  # average of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mid, ends - starts)
    return ranks


def delong(
    labels: np.ndarray, a: np.ndarray, b: np.ndarray, users: np.ndarray | None = None, *, confidence: float = 0.9
) -> PairedTest:
    """DeLong's paired AUC difference with a normal interval (module docstring); events independent."""
    y = np.asarray(labels).astype(bool)
    n_users = len(np.unique(users)) if users is not None else 0
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return _undefined("delong", "event", y.astype(np.int64), n_users, confidence)
    v10, v01, aucs = [], [], []
    for s in (np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)):
        tz = _midranks(s)
        tx, ty = _midranks(s[y]), _midranks(s[~y])
        aucs.append((tz[y].sum() - m * (m + 1) / 2.0) / (m * n))
        v10.append((tz[y] - tx) / n)  # per positive: share of negatives ranked below it
        v01.append(1.0 - (tz[~y] - ty) / m)  # per negative: share of positives ranked above it
    s10 = np.cov(np.stack(v10)) if m > 1 else np.zeros((2, 2))  # (2, 2)
    s01 = np.cov(np.stack(v01)) if n > 1 else np.zeros((2, 2))
    contrast = np.array([1.0, -1.0])
    var = contrast @ s10 @ contrast / m + contrast @ s01 @ contrast / n
    se = math.sqrt(max(float(var), 0.0))
    diff = float(aucs[0] - aucs[1])
    z = NormalDist().inv_cdf(confidence)
    return PairedTest(
        "delong", "event", len(y), n_users, m, n, float(aucs[0]), float(aucs[1]), diff, se, diff - z * se,
        diff + z * se, confidence, 0,
    )  # fmt: skip


def paired_test(
    labels: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    users: np.ndarray | None = None,
    *,
    method: Method = "bootstrap",
    unit: Unit = "user",
    confidence: float = 0.9,
    resamples: int = 1000,
    seed: int = 0,
) -> PairedTest:
    """AUC(a) - AUC(b) on the same events by ``method`` (module docstring)."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if method == "bootstrap":
        return paired_bootstrap(labels, a, b, users, unit=unit, confidence=confidence, resamples=resamples, seed=seed)
    if method == "delong":
        return delong(labels, a, b, users, confidence=confidence)
    raise ValueError(f"method={method!r} is not one of {METHODS}")
