"""Paired bootstrap over users for the difference of a per-user metric between two models.

The same idea as the trainer's gate (trainer/paired.py): both models scored the *same*
rows, so the question is the paired difference D = metric(a) - metric(b), and the unit
resampled is the user (a cluster bootstrap: a user's rows are not independent). The
gate's code is specific to AUC, and ``recipes`` may not import ``trainer``
(docs/design.md, "Layout"), so this is the metric-generic version the offline reports use.

A metric here is a weighted mean of per-user values (``recipes.coldstart.metrics.PerUser``:
GAUC, cold-item GAUC, recall@k, NDCG@k). Drawing users with replacement gives each user a
multiplicity c_u, and the resample's metric is exactly ``sum(c w v) / sum(c w)``: a user
drawn twice counts twice, as if its rows were there twice under a new user id (tested).
So each model's per-user values are computed once and every resample is a matrix product.
The users resampled are those with a value under either model. The interval is the
percentile interval at ``confidence`` (two-sided: 95% -> the 2.5% and 97.5% quantiles of
D*); resamples where a model has no user left are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from recipes.coldstart.metrics import PerUser

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], PerUser]
_BLOCK = 2_000_000  # elements of one (resamples, users) block


class PairedDiff(NamedTuple):
    diff: float  # metric(a) - metric(b) on all users
    lo: float  # percentile bounds of the bootstrap distribution of the difference
    hi: float


def _aligned(pu: PerUser, universe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weights, weights * values) over ``universe`` (sorted), zero where the metric has no value."""
    w, wv = np.zeros(len(universe)), np.zeros(len(universe))
    if len(pu.users):
        at = np.searchsorted(universe, pu.users)
        w[at], wv[at] = pu.weights, pu.weights * pu.values
    return w, wv


def reweighted(pu: PerUser, users: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The metric under user multiplicities ``counts`` (B, len(users)) -> (B,); NaN where no weight is left."""
    w, wv = _aligned(pu, users)
    den, num = counts @ w, counts @ wv
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def paired_bootstrap(
    users: np.ndarray,
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    metric: Metric,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedDiff:
    """D = metric(a) - metric(b) with its paired user-bootstrap interval (module docstring); deterministic.

    ``metric(users, labels, scores) -> PerUser``; bind other row data (items, the cold set)
    with a closure over the same rows.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    users, labels = np.asarray(users), np.asarray(labels)
    pa, pb = metric(users, labels, np.asarray(scores_a)), metric(users, labels, np.asarray(scores_b))
    diff = pa.mean() - pb.mean()
    universe = np.union1d(pa.users, pb.users)
    n = len(universe)
    if n == 0 or not np.isfinite(diff):
        return PairedDiff(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    diffs = []
    chunk = max(1, _BLOCK // n)
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        drawn = rng.integers(0, n, size=(size, n))
        flat = (drawn + n * np.arange(size)[:, None]).ravel()
        counts = np.bincount(flat, minlength=size * n).reshape(size, n).astype(np.float64)  # (B', n)
        diffs.append(reweighted(pa, universe, counts) - reweighted(pb, universe, counts))
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return PairedDiff(float(diff), float("nan"), float("nan"))
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(d, [tail, 1.0 - tail])
    return PairedDiff(float(diff), float(lo), float(hi))
