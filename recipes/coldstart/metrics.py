"""Item-side cold-start metrics: does the model rank a cold item right *within a user*?

Cold-item AUC (recipes/ranker/evaluate.py) pools the cold rows of all users, so it mostly
measures which users rate highly. These metrics compare a cold item only with rows of the
same user (docs/method.md §5, "Item cold start"). ``cold`` is the set of cold items (the
split's ``Dataset.cold_items``: held-out items and items with no training interaction).

- ``cold_item_gauc``: per user, the AUC over the (positive, negative) pairs of the user's
  test rows in which at least one of the two rows is a cold item (ties count one half);
  users with no such pair are skipped; the mean is weighted by the user's number of cold
  rows. With every item cold it is GAUC (pairs: all; weight: all rows).
- ``cold_item_recall_ndcg``: each user's test rows ranked by score, descending, ties
  broken *against* the relevant rows (a constant score earns nothing); relevant = a
  positive row of a cold item. recall@k = relevant rows in the top k / relevant rows;
  NDCG@k = DCG@k / ideal DCG@k with gain 1 and discount 1 / log2(rank + 1). Both averaged
  over the users with at least one relevant row, each user weighing one. They credit only
  cold positives near the top, so a model that shifts every cold item up gains and one that
  shifts them down loses; cold-item GAUC also charges a cold negative ranked above a warm
  positive, so read the two together.

Every metric is a weighted mean of per-user values (``PerUser``), which is what the paired
bootstrap (recipes/coldstart/bootstrap.py) resamples. NaN when no user qualifies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PerUser:
    """A metric as per-user values and weights; the metric is ``sum(w * v) / sum(w)``."""

    users: np.ndarray  # (U',) the users that have a value
    values: np.ndarray  # (U',) float64
    weights: np.ndarray  # (U',) float64, > 0

    def mean(self) -> float:
        total = float(self.weights.sum())
        return float((self.weights * self.values).sum() / total) if total > 0 else float("nan")


def _arrays(users, items, labels, scores) -> tuple[np.ndarray, ...]:
    u, i, y = np.asarray(users).ravel(), np.asarray(items).ravel(), np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not (u.shape == i.shape == y.shape == s.shape):
        raise ValueError(f"users {u.shape}, items {i.shape}, labels {y.shape} and scores {s.shape} differ in shape")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return u, i, y, s


def _by_user(u: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(distinct users sorted, row indices of each)."""
    order = np.argsort(u, kind="stable")
    bounds = np.flatnonzero(u[order][1:] != u[order][:-1]) + 1
    groups = np.split(order, bounds) if len(u) else []
    return np.asarray([u[g[0]] for g in groups]), groups


def _wins(pos: np.ndarray, neg: np.ndarray) -> float:
    """Pairs (p, n) with p > n, plus one half per tie."""
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left")
    upto = np.searchsorted(neg, pos, side="right")
    return float(below.sum() + 0.5 * (upto - below).sum())


def per_user_cold_item_gauc(users, items, labels, scores, cold) -> PerUser:
    """Per-user AUC over pairs touching a cold item, weight = the user's cold rows (module docstring)."""
    u, i, y, s = _arrays(users, items, labels, scores)
    c = np.isin(i, np.asarray(cold))
    ids, groups = _by_user(u)
    out_u, out_v, out_w = [], [], []
    for uid, g in zip(ids, groups, strict=True):
        yc, sc, cc = y[g], s[g], c[g]
        if not cc.any():
            continue
        pos, neg = sc[yc], sc[~yc]
        warm_pos, warm_neg = sc[yc & ~cc], sc[~yc & ~cc]
        pairs = len(pos) * len(neg) - len(warm_pos) * len(warm_neg)
        if pairs == 0:
            continue
        wins = _wins(pos, neg) - _wins(warm_pos, warm_neg)
        out_u.append(uid)
        out_v.append(wins / pairs)
        out_w.append(float(cc.sum()))
    return PerUser(np.asarray(out_u), np.asarray(out_v, dtype=np.float64), np.asarray(out_w, dtype=np.float64))


def cold_item_gauc(users, items, labels, scores, cold) -> float:
    """Cold-item GAUC (module docstring); NaN when no user has a pair touching a cold item."""
    return per_user_cold_item_gauc(users, items, labels, scores, cold).mean()


def _recall_ndcg_of(y_rel: np.ndarray, s: np.ndarray, k: int) -> tuple[float, float]:
    """recall@k and NDCG@k of one user's rows (relevance ``y_rel``), ties broken against the relevant."""
    order = np.lexsort((y_rel.astype(np.int8), -s))  # score descending, then non-relevant first
    top = y_rel[order][:k]
    n_rel = int(y_rel.sum())
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float((top * discount[: len(top)]).sum())
    ideal = float(discount[: min(n_rel, k)].sum())
    return float(top.sum()) / n_rel, dcg / ideal


def per_user_cold_item_recall_ndcg(users, items, labels, scores, cold, k: int = 10) -> tuple[PerUser, PerUser]:
    """(recall@k, NDCG@k) per user with a positive cold row, each user weighing one (module docstring)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    u, i, y, s = _arrays(users, items, labels, scores)
    rel = y & np.isin(i, np.asarray(cold))
    ids, groups = _by_user(u)
    out_u, rec, ndcg = [], [], []
    for uid, g in zip(ids, groups, strict=True):
        if not rel[g].any():
            continue
        r, n = _recall_ndcg_of(rel[g], s[g], k)
        out_u.append(uid)
        rec.append(r)
        ndcg.append(n)
    users_ = np.asarray(out_u)
    ones = np.ones(len(out_u), dtype=np.float64)
    return PerUser(users_, np.asarray(rec, dtype=np.float64), ones), PerUser(users_, np.asarray(ndcg), ones)


def cold_item_recall_ndcg(users, items, labels, scores, cold, k: int = 10) -> tuple[float, float]:
    """(recall@k, NDCG@k) of the cold positive rows in each user's ranking (module docstring)."""
    recall, ndcg = per_user_cold_item_recall_ndcg(users, items, labels, scores, cold, k)
    return recall.mean(), ndcg.mean()


def cold_item_metrics(users, items, labels, scores, cold, k: int = 10) -> dict[str, float]:
    """The report's cold-start columns and the user counts behind them."""
    g = per_user_cold_item_gauc(users, items, labels, scores, cold)
    recall, ndcg = per_user_cold_item_recall_ndcg(users, items, labels, scores, cold, k)
    return {
        "cold_item_gauc": g.mean(),
        "cold_item_recall": recall.mean(),
        "cold_item_ndcg": ndcg.mean(),
        "cold_item_k": k,
        "cold_item_gauc_users": len(g.users),
        "cold_item_rank_users": len(recall.users),
    }
