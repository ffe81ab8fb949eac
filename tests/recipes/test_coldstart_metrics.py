"""Item-side cold-start metrics and the paired user bootstrap (recipes/coldstart), against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recipes.coldstart import (
    cold_item_gauc,
    cold_item_metrics,
    cold_item_recall_ndcg,
    paired_bootstrap,
    per_user_cold_item_gauc,
    per_user_cold_item_recall_ndcg,
)
from recipes.coldstart.bootstrap import reweighted
from recipes.coldstart.compare import ScoredRows, paired_differences
from recipes.ranker.evaluate import auc, gauc

# (user, item, label, score); cold items: 1, 4, 5, 6.
ROWS = [
    ("A", 1, 1, 0.9),
    ("A", 2, 0, 0.5),
    ("A", 3, 1, 0.4),
    ("A", 4, 0, 0.6),
    ("B", 1, 1, 0.3),
    ("B", 2, 0, 0.3),
    ("C", 2, 1, 0.7),
    ("C", 3, 0, 0.1),
    ("D", 1, 1, 0.5),
    ("D", 3, 1, 0.6),
    ("E", 5, 1, 0.2),
    ("E", 6, 1, 0.7),
    ("E", 7, 1, 0.8),
    ("E", 8, 0, 0.9),
]
COLD = np.array([1, 4, 5, 6])


def columns(rows=ROWS):
    u, i, y, s = zip(*rows, strict=True)
    return np.array(u), np.array(i), np.array(y), np.array(s, dtype=np.float64)


def test_cold_item_gauc_hand_case() -> None:
    u, i, y, s = columns()
    # A: pairs touching a cold item: (1,2) win, (1,4) win, (3,4) loss; (3,2) is warm-warm, left out -> 2/3, weight 2.
    # B: (1,2) a tie -> 1/2, weight 1. C: warm only. D: no negative. E: negatives are warm item 8 only; cold
    # positives 5 (0.2) and 6 (0.7) both lose to it -> 0, weight 2.
    expected = (2 * (2 / 3) + 1 * 0.5 + 2 * 0.0) / 5
    assert cold_item_gauc(u, i, y, s, COLD) == pytest.approx(expected, abs=1e-12)
    per_user = per_user_cold_item_gauc(u, i, y, s, COLD)
    assert per_user.users.tolist() == ["A", "B", "E"] and per_user.weights.tolist() == [2.0, 1.0, 2.0]
    # Not the plain per-user AUC: over all its pairs, user A's AUC is 2/4 (the warm pair (3, 2) is a loss).
    assert auc(y[:4], s[:4]) == 0.5
    assert math.isnan(cold_item_gauc(u, i, y, s, np.array([99])))


def test_cold_item_gauc_matches_the_pairwise_definition_and_is_gauc_when_every_item_is_cold() -> None:
    rng = np.random.default_rng(0)
    u = rng.integers(0, 12, 300)
    i = rng.integers(0, 40, 300)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 1)  # coarse: many ties
    cold = np.arange(0, 40, 3)
    total, weight = 0.0, 0.0
    for user in np.unique(u):
        m = u == user
        c = np.isin(i[m], cold)
        wins = pairs = 0.0
        for a in range(m.sum()):
            for b in range(m.sum()):
                if y[m][a] == 1 and y[m][b] == 0 and (c[a] or c[b]):
                    pairs += 1
                    wins += (s[m][a] > s[m][b]) + 0.5 * (s[m][a] == s[m][b])
        if pairs:
            total += c.sum() * wins / pairs
            weight += c.sum()
    assert cold_item_gauc(u, i, y, s, cold) == pytest.approx(total / weight, abs=1e-12)
    assert cold_item_gauc(u, i, y, s, np.unique(i)) == pytest.approx(gauc(u, y, s), abs=1e-12)


def test_cold_item_recall_ndcg_hand_case() -> None:
    u, i, y, s = columns()
    # Relevant = positive rows of cold items. Users with one: A (item 1), B (item 1), D (item 1), E (items 5, 6).
    # A ranks 1 first. B: item 1 ties with warm item 2 at 0.3, broken against it -> second.
    # D: 3 (0.6) then 1 (0.5) -> second. E: 8, 7, 6, 5 -> item 6 third, item 5 fourth.
    d2, d3 = 1 / math.log2(3), 1 / math.log2(4)
    recall, ndcg = cold_item_recall_ndcg(u, i, y, s, COLD, k=2)
    assert recall == pytest.approx((1 + 1 + 1 + 0) / 4)
    assert ndcg == pytest.approx((1 + d2 + d2 + 0) / 4)
    recall, ndcg = cold_item_recall_ndcg(u, i, y, s, COLD, k=1)
    assert (recall, ndcg) == (0.25, 0.25)
    r3, n3 = per_user_cold_item_recall_ndcg(u, i, y, s, COLD, k=3)
    assert r3.users.tolist() == ["A", "B", "D", "E"]
    assert r3.values[3] == 0.5 and n3.values[3] == pytest.approx(d3 / (1 + d2))
    with pytest.raises(ValueError, match="k must"):
        cold_item_recall_ndcg(u, i, y, s, COLD, k=0)
    metrics = cold_item_metrics(u, i, y, s, COLD, k=2)
    assert metrics["cold_item_gauc_users"] == 3 and metrics["cold_item_rank_users"] == 4
    assert metrics["cold_item_recall"] == pytest.approx(0.75)


def _users(n_users: int, rows_per_user: int, seed: int):
    rng = np.random.default_rng(seed)
    u = np.repeat(np.arange(n_users), rows_per_user)
    i = rng.integers(0, 50, len(u))
    y = np.tile(np.arange(rows_per_user) % 2, n_users)  # every user has both classes
    return u, i, y, rng


def test_bootstrap_reweighting_is_the_metric_of_the_resampled_users() -> None:
    """A user drawn c times weighs as if its rows were there c times under new user ids."""
    u, i, y, rng = _users(8, 6, 1)
    s = rng.random(len(u))
    cold = np.arange(0, 50, 2)
    counts = np.array([[2, 0, 1, 0, 3, 1, 0, 1]], dtype=np.float64)
    rows = [np.flatnonzero(u == user) for user in range(8) for _ in range(int(counts[0, user]))]
    new_u = np.concatenate([np.full(len(r), k) for k, r in enumerate(rows)])
    take = np.concatenate(rows)
    explicit = cold_item_gauc(new_u, i[take], y[take], s[take], cold)
    assert reweighted(per_user_cold_item_gauc(u, i, y, s, cold), np.arange(8), counts)[0] == pytest.approx(explicit)
    recall = per_user_cold_item_recall_ndcg(u, i, y, s, cold, 2)[0]
    explicit_recall = cold_item_recall_ndcg(new_u, i[take], y[take], s[take], cold, 2)[0]
    assert reweighted(recall, np.arange(8), counts)[0] == pytest.approx(explicit_recall)


def test_paired_bootstrap_on_constructed_scores() -> None:
    u, i, y, rng = _users(60, 8, 2)
    cold = np.arange(0, 50, 2)

    def metric(uu, yy, ss):
        return per_user_cold_item_gauc(uu, i, yy, ss, cold)

    noise = rng.random(len(u))
    same = paired_bootstrap(u, y, noise, noise.copy(), metric, n_boot=300)
    assert same.diff == 0.0 and same.lo <= 0.0 <= same.hi

    # a ranks every positive above every negative for every user; b is noise: better on every user with a pair.
    perfect = y + 0.1 * noise
    better = paired_bootstrap(u, y, perfect, noise, metric, n_boot=300)
    assert better.diff == pytest.approx(cold_item_gauc(u, i, y, perfect, cold) - cold_item_gauc(u, i, y, noise, cold))
    assert better.lo > 0.0 and better.hi >= better.diff >= better.lo
    worse = paired_bootstrap(u, y, noise, perfect, metric, n_boot=300)
    assert worse.hi < 0.0 and worse.diff == pytest.approx(-better.diff)
    # Deterministic given the seed; another seed moves the bounds, not the estimate.
    assert paired_bootstrap(u, y, perfect, noise, metric, n_boot=300) == better
    other = paired_bootstrap(u, y, perfect, noise, metric, n_boot=300, seed=1)
    assert other.diff == better.diff and other.lo != better.lo


def test_paired_bootstrap_interval_narrows_with_more_users() -> None:
    widths = []
    for n_users in (20, 320):
        u, i, y, rng = _users(n_users, 8, 3)
        a, b = rng.random(len(u)), rng.random(len(u))  # two unrelated scorers of the same (no) skill

        def metric(uu, yy, ss, items=i):
            return per_user_cold_item_gauc(uu, items, yy, ss, np.unique(items))

        r = paired_bootstrap(u, y, a, b, metric, n_boot=400)
        widths.append(r.hi - r.lo)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(16) of it


def test_paired_differences_pair_seeds_against_the_reference() -> None:
    u, i, y, rng = _users(30, 6, 4)
    cold = np.arange(0, 50, 2)
    noise = rng.random(len(u))
    scored = {
        ("hmat", 0): ScoredRows(u, i, y, y + 0.1 * noise),
        ("id", 0): ScoredRows(u, i, y, noise),
        ("hmat", 1): ScoredRows(u, i, y, noise),  # no reference run of seed 1: left out
    }
    out = paired_differences(scored, "id", cold, k=2, n_boot=200)
    assert [(p["label"], p["seed"], p["reference"]) for p in out] == [("hmat", 0, "id")]
    assert out[0]["gauc"][0] == pytest.approx(gauc(u, y, y + 0.1 * noise) - gauc(u, y, noise))
    assert out[0]["cold_item_gauc"][1] > 0.0
    scored[("id", 0)] = ScoredRows(u[::-1].copy(), i, y, noise)
    with pytest.raises(ValueError, match="different rows"):
        paired_differences(scored, "id", cold)
