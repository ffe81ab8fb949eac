"""HMAT model core (models/hmat/model.py, sequence.py): H-RoPE, attention paths, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.hmat.model import HMAT, HMATConfig, HRoPE, apply_hrope, hmat_cpu, hmat_large, hmat_small
from models.hmat.sequence import TokenType, UserSequence, build_stream
from models.hmat.testing import scrambled
from models.hmat.testing import tiny_config as _tiny


def tiny_config() -> HMATConfig:
    return _tiny(max_items=6)


def random_user(cfg: HMATConfig, n_items: int, n_candidates: int = 0) -> UserSequence:
    return UserSequence(
        profile=torch.randint(cfg.profile_vocab_size, (2,)).tolist(),
        sids=torch.randint(cfg.codebook_size, (n_items, cfg.n_sid)),
        actions=torch.randint(cfg.n_actions, (n_items,)),
        candidates=torch.randint(cfg.codebook_size, (n_candidates, cfg.n_sid)),
    )


def test_presets_match_the_paper() -> None:
    small, large, cpu = hmat_small(), hmat_large(), hmat_cpu()
    assert (small.n_layer, small.hidden, small.ffn, small.n_head, small.n_kv_head) == (4, 512, 2560, 8, 2)
    assert large.n_layer == 12 and large.hidden == 512
    assert cpu.n_layer == 2 and 64 <= cpu.hidden <= 128
    assert small.rope_inter_dims == small.head_dim // 2 and small.max_items == 300
    layout = small.layout
    # Codebooks never share an id; the last code of the last codebook is the last id.
    assert layout.sid_token(1, 0) == layout.sid_token(0, 255) + 1
    assert layout.sid_token(5, 255) == layout.vocab_size - 1


def test_config_rejects_bad_gqa() -> None:
    with pytest.raises(ValueError, match="n_kv_head"):
        HMATConfig(n_head=8, n_kv_head=3)


def test_hrope_scores_depend_only_on_relative_offsets() -> None:
    cfg = tiny_config()
    rope, D, d_i = HRoPE(cfg), cfg.head_dim, cfg.rope_inter_dims
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(qc: tuple[int, int], kc: tuple[int, int]) -> tuple[float, float]:
        cq, sq = rope(torch.tensor([[qc]]))
        ck, sk = rope(torch.tensor([[kc]]))
        prod = apply_hrope(q, cq, sq, d_i) * apply_hrope(k, ck, sk, d_i)  # (1, 1, 1, D)
        return float(prod[..., :d_i].sum()), float(prod[..., d_i:].sum())  # inter, intra terms

    inter, intra = score((5, 2), (2, 0))
    for di, dj in [(1, 0), (0, 2), (2, 1)]:
        torch.testing.assert_close(score((5 + di, 2 + dj), (2 + di, 0 + dj)), (inter, intra), rtol=0, atol=1e-5)
    # The inter term sees only i offsets, the intra term only j offsets.
    assert score((5, 0), (2, 3))[0] == pytest.approx(inter, abs=1e-5)
    assert score((4, 2), (1, 0))[1] == pytest.approx(intra, abs=1e-5)
    # And the score is not blind to them.
    assert abs(score((6, 2), (2, 0))[0] - inter) > 1e-3
    assert abs(score((5, 2), (2, 1))[1] - intra) > 1e-3


def test_hrope_tables_are_fp32_and_not_saved() -> None:
    model = HMAT(tiny_config())
    assert model.rope.cos_a.dtype == torch.float32
    assert not any("rope" in name for name in model.state_dict())


def test_sdpa_matches_reference() -> None:
    cfg = tiny_config()
    model = scrambled(HMAT(cfg))
    s = build_stream([random_user(cfg, 4, 3), random_user(cfg, 2, 1)], cfg.layout)
    ref = model.forward_stream(s, attn_impl="reference")
    fast = model.forward_stream(s, attn_impl="sdpa")
    valid = s.valid
    # Same fp32 arithmetic, different summation order inside the fused kernel.
    torch.testing.assert_close(fast[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_rope1d_ablation_and_causal_ablation_run() -> None:
    for cfg in (dataclasses.replace(tiny_config(), rope="rope1d"), dataclasses.replace(tiny_config(), ma_attn=False)):
        model = HMAT(cfg).eval()
        s = build_stream([random_user(cfg, 3, 2)], cfg.layout)
        assert torch.isfinite(model.forward_stream(s)).all()


def test_small_preset_runs() -> None:
    cfg = hmat_small()
    model = HMAT(cfg).eval()
    user = UserSequence(
        profile=[3],
        sids=torch.randint(cfg.codebook_size, (10, cfg.n_sid)),
        actions=torch.randint(2, (10,)),
        candidates=torch.randint(cfg.codebook_size, (2, cfg.n_sid)),
    )
    s = build_stream([user], cfg.layout)
    assert s.tokens.shape == (1, 1 + 10 * 8 + 2 * 7)
    with torch.no_grad():
        assert torch.isfinite(model.forward_stream(s)).all()


def test_empty_history_is_profile_only() -> None:
    cfg = tiny_config()
    model = HMAT(cfg).eval()
    s = build_stream([UserSequence(profile=[1, 2], candidates=[[0, 1, 2]])], cfg.layout)
    assert s.token_type[0].tolist() == [TokenType.PROFILE] * 2 + [TokenType.CAND_SID] * 3 + [TokenType.CAND_ANCHOR]
    assert s.pos_i[0, 2:].tolist() == [1] * 4  # candidates at i = T + 1 = 1
    assert torch.isfinite(model.forward_stream(s)).all()


def test_unknown_codes_raise_naming_the_position() -> None:
    layout = tiny_config().layout
    with pytest.raises(ValueError, match=r"user 0, history item 1, semantic ID 2: id 16 is outside \[0, 16\)"):
        build_stream([UserSequence(sids=[[0, 0, 0], [0, 0, 16]], actions=[0, 1])], layout)
    with pytest.raises(ValueError, match="user 1, profile token 0"):
        build_stream([UserSequence(), UserSequence(profile=[99])], layout)
    with pytest.raises(ValueError, match="candidate 0, semantic ID 0"):
        build_stream([UserSequence(candidates=[[-1, 0, 0]])], layout)
    with pytest.raises(ValueError, match="action"):
        build_stream([UserSequence(sids=[[0, 0, 0]], actions=[2])], layout)
    # Positions name the input as given, even for an item that truncation would drop.
    too_long = torch.zeros(layout.max_items + 2, 3, dtype=torch.long)
    too_long[0, 1] = 99
    with pytest.raises(ValueError, match="history item 0, semantic ID 1"):
        build_stream([UserSequence(sids=too_long, actions=torch.zeros(layout.max_items + 2, dtype=torch.long))], layout)
    with pytest.raises(ValueError, match="2 history items but 1 actions"):
        build_stream([UserSequence(sids=[[0, 0, 0], [0, 0, 0]], actions=[1])], layout)


def test_unknown_token_ids_raise_in_forward() -> None:
    cfg = tiny_config()
    model = HMAT(cfg)
    s = build_stream([random_user(cfg, 2)], cfg.layout)
    s.tokens[0, 3] = cfg.vocab_size
    with pytest.raises(ValueError, match="batch 0, position 3"):
        model.forward_stream(s)


def test_overlong_history_keeps_most_recent_items() -> None:
    cfg = tiny_config()
    sids = torch.arange(9 * 3).reshape(9, 3) % cfg.codebook_size
    actions = torch.arange(9) % 2
    s = build_stream([UserSequence(sids=sids, actions=actions)], cfg.layout)
    kept = build_stream([UserSequence(sids=sids[-cfg.max_items :], actions=actions[-cfg.max_items :])], cfg.layout)
    assert int(s.n_items[0]) == cfg.max_items
    for name in ("tokens", "pos_i", "pos_j", "order"):
        assert torch.equal(getattr(s, name), getattr(kept, name))
