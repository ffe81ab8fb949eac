"""One-pass ranking and the anchor KV cache (models/hmat/inference.py, docs/method.md §4).

The oracle is the full forward pass over the whole stream; tolerances are 1e-5 in fp32
because cached and full runs sum the same terms in a different order.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.hmat.inference import append_history, encode_history, rank_candidates, score_with_cache
from models.hmat.model import HMAT, HMATConfig, hmat_cpu
from models.hmat.sequence import UserSequence, build_stream
from models.hmat.testing import scrambled, tiny_config

ATOL = 1e-5


def history(cfg: HMATConfig, n_items: int, n_profile: int = 2) -> UserSequence:
    return UserSequence(
        profile=torch.randint(cfg.profile_vocab_size, (n_profile,)).tolist(),
        sids=torch.randint(cfg.codebook_size, (n_items, cfg.n_sid)),
        actions=torch.randint(cfg.n_actions, (n_items,)),
    )


def with_candidates(u: UserSequence, candidates: torch.Tensor) -> UserSequence:
    return dataclasses.replace(u, candidates=candidates)


@pytest.mark.parametrize(
    "changes",
    [{}, {"action_is_memory": False}, {"rope": "rope1d"}, {"ma_attn": False}, {"attn_impl": "reference"}],
    ids=["ma", "anchor-only", "rope1d", "causal", "reference"],
)
def test_cached_scores_equal_full_forward(changes: dict) -> None:
    cfg = tiny_config(**changes)
    model = scrambled(HMAT(cfg))
    users = [history(cfg, 5), history(cfg, 2, n_profile=1), history(cfg, 0)]
    cands = torch.randint(cfg.codebook_size, (3, 4, cfg.n_sid))  # (B, N, k)
    full = rank_candidates(
        model, build_stream([with_candidates(u, c) for u, c in zip(users, cands, strict=True)], cfg.layout)
    )
    cache = encode_history(model, build_stream(users, cfg.layout))
    cached = score_with_cache(model, cache, cands)
    assert (full - cached).abs().max() <= ATOL
    assert full.std() > 1e-3  # the scores are not all the same number


def test_cached_scores_equal_full_forward_at_full_length() -> None:
    """300 items (positions up to i = 301, flat ~2400) with the CPU preset's real vocabulary."""
    cfg = hmat_cpu()
    model = scrambled(HMAT(cfg))
    u = history(cfg, cfg.max_items + 5)  # the 5 oldest are dropped
    cands = torch.randint(cfg.codebook_size, (1, 3, cfg.n_sid))
    full = rank_candidates(model, build_stream([with_candidates(u, cands[0])], cfg.layout))
    cache = encode_history(model, build_stream([u], cfg.layout))
    assert cache.n_slots == 2 + 2 * cfg.max_items and int(cache.n_items[0]) == cfg.max_items
    assert (full - score_with_cache(model, cache, cands)).abs().max() <= ATOL


def test_cache_keeps_only_profile_and_memory() -> None:
    cfg = tiny_config()
    cache = encode_history(scrambled(HMAT(cfg)), build_stream([history(cfg, 5), history(cfg, 2)], cfg.layout))
    assert cache.n_slots == 2 + 2 * 5  # P + 2T instead of P + (k + 2) T
    assert cache.keys[0].shape == (2, cfg.n_kv_head, 12, cfg.head_dim)
    assert cache.slots.pos_i[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert cache.slots.pos_j[0, 2:4].tolist() == [cfg.n_sid, cfg.n_sid + 1]  # anchor, action
    anchor_only = tiny_config(action_is_memory=False)
    assert (
        encode_history(HMAT(anchor_only).eval(), build_stream([history(anchor_only, 5)], anchor_only.layout)).n_slots
        == 2 + 5
    )


def test_incremental_append_equals_reencoding() -> None:
    cfg = tiny_config()
    model = scrambled(HMAT(cfg))
    users = [history(cfg, 3), history(cfg, 1, n_profile=1)]
    new_sids = torch.randint(cfg.codebook_size, (2, 2, cfg.n_sid))  # (B, T_new, k)
    new_actions = torch.randint(cfg.n_actions, (2, 2))
    cache = encode_history(model, build_stream(users, cfg.layout))
    cache = append_history(model, cache, new_sids[:, :1], new_actions[:, :1])  # one item ...
    cache = append_history(model, cache, new_sids[:, 1:], new_actions[:, 1:])  # ... then another
    longer = [
        dataclasses.replace(u, sids=torch.cat([u.sids, s]), actions=torch.cat([u.actions, a]))
        for u, s, a in zip(users, new_sids, new_actions, strict=True)
    ]
    fresh = encode_history(model, build_stream(longer, cfg.layout))
    assert torch.equal(cache.n_items, fresh.n_items) and torch.equal(cache.next_order, fresh.next_order)
    # Same logical slots (appends sit after the first user's padding, so compare by valid slot).
    for b in range(2):
        a_valid, f_valid = cache.slots.valid[b], fresh.slots.valid[b]
        for name in ("tokens", "order", "pos_i", "pos_j"):
            assert torch.equal(getattr(cache.slots, name)[b][a_valid], getattr(fresh.slots, name)[b][f_valid])
        for layer in range(cfg.n_layer):
            torch.testing.assert_close(
                cache.keys[layer][b][:, a_valid], fresh.keys[layer][b][:, f_valid], rtol=0, atol=ATOL
            )
            torch.testing.assert_close(
                cache.values[layer][b][:, a_valid], fresh.values[layer][b][:, f_valid], rtol=0, atol=ATOL
            )
    cands = torch.randint(cfg.codebook_size, (2, 3, cfg.n_sid))
    assert (score_with_cache(model, cache, cands) - score_with_cache(model, fresh, cands)).abs().max() <= ATOL


def test_append_past_max_items_raises() -> None:
    cfg = tiny_config(max_items=2)
    model = HMAT(cfg).eval()
    cache = encode_history(model, build_stream([history(cfg, 2)], cfg.layout))
    with pytest.raises(ValueError, match="max_items=2"):
        append_history(
            model, cache, torch.zeros(1, 1, cfg.n_sid, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
        )


def test_candidate_score_independent_of_order_and_company() -> None:
    cfg = tiny_config()
    model = scrambled(HMAT(cfg))
    u = history(cfg, 4)
    cands = torch.randint(cfg.codebook_size, (5, cfg.n_sid))
    base = rank_candidates(model, build_stream([with_candidates(u, cands)], cfg.layout))[0]  # (N,)
    perm = torch.randperm(5)
    permuted = rank_candidates(model, build_stream([with_candidates(u, cands[perm])], cfg.layout))[0]
    assert (permuted - base[perm]).abs().max() <= ATOL
    others = torch.randint(cfg.codebook_size, (3, cfg.n_sid))
    mixed = rank_candidates(model, build_stream([with_candidates(u, torch.cat([others, cands[2:3]]))], cfg.layout))[0]
    alone = rank_candidates(model, build_stream([with_candidates(u, cands[2:3])], cfg.layout))[0]
    assert abs(float(mixed[3] - base[2])) <= ATOL and abs(float(alone[0] - base[2])) <= ATOL
    # Batching with another user (and the padding that brings) changes nothing either.
    batched = rank_candidates(
        model, build_stream([with_candidates(history(cfg, 7), cands[:2]), with_candidates(u, cands)], cfg.layout)
    )
    assert (batched[1] - base).abs().max() <= ATOL
    assert torch.isnan(batched[0, 2:]).all()  # the first user has only 2 candidates


def test_memory_anchor_changes_what_the_model_sees() -> None:
    """Sanity: the MA mask is not a no-op, so the equalities above are not vacuous."""
    ma, causal = tiny_config(), tiny_config(ma_attn=False)
    model = scrambled(HMAT(ma))
    other = HMAT(causal).eval()
    other.load_state_dict(model.state_dict())
    s = build_stream([with_candidates(history(ma, 4), torch.randint(ma.codebook_size, (3, ma.n_sid)))], ma.layout)
    assert (rank_candidates(model, s) - rank_candidates(other, s)).abs().max() > 1e-3


@pytest.mark.parametrize(
    "changes", [{}, {"action_is_memory": False}, {"ma_attn": False}], ids=["ma", "anchor", "causal"]
)
def test_block_structured_cache_scoring_equals_dense_mask(changes: dict) -> None:
    """The fast path (``CachedBlocks``) against the dense mask, on a cache with padding slots in the middle."""
    cfg = tiny_config(**changes)
    model = scrambled(HMAT(cfg))
    users = [history(cfg, 3), history(cfg, 1, n_profile=1), history(cfg, 0)]
    cache = encode_history(model, build_stream(users, cfg.layout))
    more = torch.randint(cfg.codebook_size, (3, 2, cfg.n_sid))
    cache = append_history(model, cache, more, torch.randint(cfg.n_actions, (3, 2)))  # padding now mid-cache
    cands = torch.randint(cfg.codebook_size, (3, 5, cfg.n_sid))
    for impl in ("reference", "sdpa"):
        dense = score_with_cache(model, cache, cands, attn_impl=impl)
        assert (score_with_cache(model, cache, cands) - dense).abs().max() <= ATOL


def test_cached_blocks_dense_is_the_ma_attn_mask() -> None:
    """``CachedBlocks.dense`` says the same as ``attention_mask`` on a candidate continuation."""
    from models.hmat.mask import CachedBlocks
    from models.hmat.sequence import continue_stream

    cfg = tiny_config()
    model = scrambled(HMAT(cfg))
    cache = encode_history(model, build_stream([history(cfg, 3), history(cfg, 1)], cfg.layout))
    cands = torch.randint(cfg.codebook_size, (2, 3, cfg.n_sid))
    new = continue_stream(cfg.layout, cache.n_items, cache.next_order, candidates=cands)
    expected = model.stream_mask(new, cache.slots.cat(new))
    got = CachedBlocks(cache.slots.valid, cfg.n_sid + 1).dense(new.tokens.shape[1])
    assert torch.equal(got, expected)


def test_candidate_stream_equals_continue_stream() -> None:
    """The tensor-op candidate continuation (Rank's hot path, the ONNX graph) against the Python reference."""
    from models.hmat.sequence import candidate_stream, continue_stream

    cfg = tiny_config()
    n_items, next_order = torch.tensor([0, 3, 8]), torch.tensor([2, 17, 41])
    cands = torch.randint(cfg.codebook_size, (3, 4, cfg.n_sid))
    fast = candidate_stream(cfg.layout, n_items, next_order, cands)
    ref = continue_stream(cfg.layout, n_items, next_order, candidates=cands)
    for field in dataclasses.fields(fast):
        assert torch.equal(getattr(fast, field.name), getattr(ref, field.name)), field.name


def test_cached_scoring_rejects_bad_candidate_codes() -> None:
    cfg = tiny_config()
    model = scrambled(HMAT(cfg))
    cache = encode_history(model, build_stream([history(cfg, 2)], cfg.layout))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        score_with_cache(model, cache, torch.full((1, 2, cfg.n_sid), cfg.codebook_size))
    with pytest.raises(ValueError, match="codes each"):
        score_with_cache(model, cache, torch.zeros((1, 2, cfg.n_sid + 1), dtype=torch.long))
