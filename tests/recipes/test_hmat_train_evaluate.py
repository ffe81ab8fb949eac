"""Ranking metrics and batched scoring (recipes/ranker/evaluate.py, docs/method.md §5).

The oracle for AUC is the definition itself: the share of (positive, negative) pairs the
scores order correctly, ties counting one half, counted pair by pair.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from models.hmat.inference import rank_candidates
from models.hmat.model import HMAT, hmat_cpu
from models.hmat.sequence import UserSequence, build_stream
from recipes.ranker.evaluate import (
    Timeline,
    _group_streams,
    _item_table,
    auc,
    average_ranks,
    event_groups,
    gauc,
    pack_batches,
    ranking_metrics,
    score_examples,
    score_timelines,
    timeline_examples,
)


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_cases() -> None:
    # Positives 0.9 and 0.4, negatives 0.1 and 0.5: 0.9 beats both, 0.4 beats 0.1 only -> 3/4.
    assert auc([1, 0, 1, 0], [0.9, 0.1, 0.4, 0.5]) == 0.75
    assert auc([1, 0], [0.5, 0.5]) == 0.5  # a tie is half a win
    assert auc([1, 1, 0], [0.2, 0.3, 0.9]) == 0.0
    assert auc([0, 1], [0.1, 0.7]) == 1.0
    assert math.isnan(auc([1, 1], [0.1, 0.2])) and math.isnan(auc([], []))


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        s = np.round(rng.random(60), 1)  # coarse: many ties
        assert auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)


def test_average_ranks_share_ties() -> None:
    assert average_ranks(np.array([0.3, 0.1, 0.3, 0.2])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_auc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        auc([1, 0], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        auc([1, 0], [0.1, float("nan")])


def test_gauc_weights_users_by_impressions_and_skips_single_class_users() -> None:
    users = ["a", "a", "b", "b", "b", "c", "c"]
    labels = [1, 0, 1, 0, 0, 1, 1]
    scores = [0.8, 0.2, 0.1, 0.5, 0.05, 0.3, 0.4]
    # a: AUC 1 over 2 rows; b: positive 0.1 beats 0.05, loses to 0.5 -> 0.5 over 3 rows; c: one class.
    assert gauc(np.array(users), labels, scores) == pytest.approx((1.0 * 2 + 0.5 * 3) / 5)
    assert math.isnan(gauc(["c", "c"], [1, 1], [0.1, 0.2]))


def test_ranking_metrics_restrict_to_cold_users_and_items() -> None:
    rng = np.random.default_rng(1)
    n = 200
    users, items = rng.integers(0, 20, n), rng.integers(0, 30, n)
    labels, scores = rng.integers(0, 2, n), rng.random(n)
    cold_u, cold_i = np.array([1, 4, 7, 9]), np.array([0, 3, 5, 11, 12])
    m = ranking_metrics(users, items, labels, scores, cold_u, cold_i)
    cu, ci = np.isin(users, cold_u), np.isin(items, cold_i)
    assert m["auc"] == pytest.approx(pairwise_auc(labels, scores))
    assert m["cold_user_auc"] == pytest.approx(pairwise_auc(labels[cu], scores[cu]))
    assert m["cold_item_auc"] == pytest.approx(pairwise_auc(labels[ci], scores[ci]))
    assert m["cold_user_gauc"] == pytest.approx(gauc(users[cu], labels[cu], scores[cu]))
    assert (m["rows"], m["cold_user_rows"], m["cold_item_rows"]) == (n, int(cu.sum()), int(ci.sum()))


def test_pack_batches_respects_budget_and_covers_every_example() -> None:
    lengths = [5, 40, 12, 40, 7, 100, 3]
    batches = pack_batches(lengths, max_tokens=80, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [5]  # longer than the budget: alone
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 80)


def test_batched_scores_equal_one_stream_at_a_time() -> None:
    cfg = dataclasses.replace(
        hmat_cpu(), n_sid=3, codebook_size=16, profile_vocab_size=8, max_items=8, max_profile_len=4
    )
    model = HMAT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    examples = [
        UserSequence(
            [b % 8], torch.randint(16, (b % 7, 3)), torch.randint(2, (b % 7,)), torch.randint(16, (1 + b % 3, 3))
        )
        for b in range(11)
    ]
    batched = score_examples(model, examples, max_tokens=120, progress=False)
    alone = np.concatenate([rank_candidates(model, build_stream([u], cfg.layout))[0].numpy() for u in examples])
    assert batched.shape == alone.shape == (sum(1 + b % 3 for b in range(11)),)
    np.testing.assert_allclose(batched, alone, atol=1e-5)  # padding changes summation order only


# --- Timelines: the grouped stream protocol against its definition ------------------------------


def timeline(t0: int, n_events: int, profile_len: int = 1, seed: int | None = None) -> Timeline:
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return Timeline(
        profile=[(t0 + p) % 8 for p in range(profile_len)],
        sids=torch.randint(16, (t0, 3), generator=g),
        actions=torch.randint(2, (t0,), generator=g),
        event_sids=torch.randint(16, (n_events, 3), generator=g),
        event_actions=torch.randint(2, (n_events,), generator=g),
    )


def tiny_model(**changes) -> HMAT:
    cfg = dataclasses.replace(
        hmat_cpu(), n_sid=3, codebook_size=16, profile_vocab_size=8, max_items=4, max_profile_len=4, **changes
    )
    torch.manual_seed(0)
    model = HMAT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def test_timeline_examples_follow_the_definition() -> None:
    tl = timeline(3, 4)
    ex = timeline_examples([tl], max_items=4)
    assert [len(e.sids) for e in ex] == [3, 4, 4, 4]  # 3 + k items, the last 4
    assert torch.equal(ex[3].sids, torch.cat([tl.sids, tl.event_sids])[2:6])
    assert torch.equal(ex[3].actions, torch.cat([tl.actions, tl.event_actions])[2:6])
    assert all(torch.equal(e.candidates, tl.event_sids[k : k + 1]) for k, e in enumerate(ex))
    assert len(timeline_examples([tl], 4, skip=[2])) == 2


def test_event_groups_share_a_stream_until_the_window_slides() -> None:
    tls = [timeline(1, 6), timeline(4, 2), timeline(7, 2), timeline(0, 0), timeline(0, 3)]
    # T = 4: t0 = 1 shares events 0..3 (t0 + k <= 4), then one stream per event.
    assert event_groups(tls, 4) == [
        (0, 0, 4),
        (0, 4, 1),
        (0, 5, 1),
        (1, 0, 1),
        (1, 1, 1),
        (2, 0, 1),
        (2, 1, 1),
        (4, 0, 3),
    ]


FIELDS = ("tokens", "token_type", "item", "block", "order", "pos_i", "pos_j", "pos_flat")


def field_rows(stream, b: int, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    valid = stream.valid[b] if keep is None else keep
    return {f: getattr(stream, f)[b][valid] for f in FIELDS}


def test_group_streams_equal_build_stream_field_by_field() -> None:
    """A single event: the definition's stream itself. Several: history + events as build_stream
    lays them out, and each candidate block as in its event's own stream (order aside)."""
    model = tiny_model()
    layout, T = model.config.layout, model.config.max_items
    tls = [timeline(1, 4, profile_len=2, seed=1), timeline(6, 2, profile_len=3, seed=2), timeline(0, 2, seed=3)]
    table = _item_table(tls, layout, torch.device("cpu"))
    groups = event_groups(tls, T)
    defs = timeline_examples(tls, T)
    row_of = {
        (i, k): r for r, (i, k) in enumerate((i, k) for i, tl in enumerate(tls) for k in range(len(tl.event_sids)))
    }
    stream = _group_streams(table, layout, T, torch.tensor(groups), width=60)
    for b, (i, first, n) in enumerate(groups):
        want = build_stream([defs[row_of[(i, first)]]], layout)
        if n == 1:
            got = field_rows(stream, b)
            assert all(torch.equal(got[f], field_rows(want, 0)[f]) for f in FIELDS), (i, first)
            continue
        history = build_stream(
            [UserSequence(tls[i].profile, defs[row_of[(i, n - 1)]].sids, defs[row_of[(i, n - 1)]].actions)], layout
        )
        is_cand = stream.block[b] >= 0
        got = field_rows(stream, b, stream.valid[b] & ~is_cand)
        assert all(torch.equal(got[f], field_rows(history, 0)[f]) for f in FIELDS if f != "order")
        assert torch.equal(got["order"].diff() > 0, torch.ones(len(got["order"]) - 1, dtype=torch.bool))
        for e in range(n):
            block = build_stream([defs[row_of[(i, first + e)]]], layout)
            cand = field_rows(stream, b, stream.block[b] == e)
            want_cand = field_rows(block, 0, block.block[0] == 0)
            assert all(torch.equal(cand[f], want_cand[f]) for f in FIELDS if f not in ("order", "block")), e


def test_group_streams_refuse_ids_outside_the_vocabulary() -> None:
    layout = tiny_model().config.layout
    bad = timeline(2, 2)
    bad.event_sids[1, 0] = 16
    with pytest.raises(ValueError, match="timeline 1"):
        _item_table([timeline(1, 1), bad], layout, torch.device("cpu"))
    with pytest.raises(ValueError, match="5 tokens"):
        _item_table([timeline(0, 1, profile_len=5)], layout, torch.device("cpu"))
    wrong_profile = timeline(1, 1)
    wrong_profile.profile = [8]
    with pytest.raises(ValueError, match="timeline 0: a profile id"):
        _item_table([wrong_profile], layout, torch.device("cpu"))


@pytest.mark.parametrize(
    "changes",
    [{}, {"ma_attn": False, "rope": "rope1d"}, {"action_is_memory": False}],
    ids=["hmat", "flat", "anchor-only-memory"],
)
def test_grouped_timeline_scores_equal_one_stream_per_event(changes: dict) -> None:
    """Histories below, at and above T = 4 (the shared stream and the sliding streams both
    run), profiles of different lengths, batches that mix users: per-row scores and the
    metrics equal the definition's."""
    model = tiny_model(**changes)
    spec = [(0, 3), (2, 5), (4, 2), (6, 3), (1, 0), (3, 1), (0, 6), (1, 9), (5, 4), (2, 2), (0, 1), (3, 7)]
    tls = [timeline(t0, e, profile_len=1 + u % 3, seed=u) for u, (t0, e) in enumerate(spec)]
    grouped = score_timelines(model, tls, max_tokens=120, progress=False)
    oracle = score_examples(model, timeline_examples(tls, model.config.max_items), progress=False)
    assert grouped.shape == oracle.shape == (sum(e for _, e in spec),) and np.isfinite(grouped).all()
    np.testing.assert_allclose(grouped, oracle, atol=1e-5)  # summation order only
    users = np.repeat(np.arange(len(spec)), [e for _, e in spec])
    labels = torch.cat([tl.event_actions for tl in tls]).numpy()
    assert auc(labels, grouped) == pytest.approx(auc(labels, oracle), abs=1e-6)
    assert gauc(users, labels, grouped) == pytest.approx(gauc(users, labels, oracle), abs=1e-6)


def test_grouped_scores_do_not_depend_on_batching() -> None:
    model = tiny_model()
    tls = [timeline(t0, e, seed=t0) for t0, e in [(0, 5), (3, 3), (6, 2), (1, 4)]]
    one_by_one = np.concatenate([score_timelines(model, [tl], progress=False) for tl in tls])
    np.testing.assert_allclose(score_timelines(model, tls, max_tokens=10_000, progress=False), one_by_one, atol=1e-5)
    assert score_timelines(model, [timeline(2, 0)], progress=False).shape == (0,)
