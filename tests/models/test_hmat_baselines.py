"""Baselines and ablations as HMAT configurations (models/hmat/baselines.py, docs/method.md §5)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.hmat.baselines import VARIANTS, id_codes, uses_item_ids, variant_config
from models.hmat.inference import rank_candidates
from models.hmat.losses import pt_loss, sft_loss
from models.hmat.model import HMAT, HMATConfig, hmat_cpu
from models.hmat.sequence import UserSequence, build_stream

N_ITEMS = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def base() -> HMATConfig:
    return dataclasses.replace(
        hmat_cpu(), n_sid=3, codebook_size=16, profile_vocab_size=8, max_items=8, max_profile_len=4
    )


def users_for(cfg: HMATConfig, variant: str, n: int = 3) -> list[UserSequence]:
    """Histories whose items are drawn from N_ITEMS items: as item ids or as random codes."""
    table = torch.from_numpy(id_codes(N_ITEMS)) if uses_item_ids(variant) else torch.randint(16, (N_ITEMS, 3))
    out = []
    for b in range(n):
        items = torch.randint(N_ITEMS, (2 + b,))
        out.append(UserSequence(profile=[b], sids=table[items], actions=torch.randint(2, (2 + b,))))
    return out


def test_variant_flags() -> None:
    flags = {v: (c.rope, c.ma_attn, c.n_sid) for v in VARIANTS for c in [variant_config(base(), v, n_items=N_ITEMS)]}
    assert flags == {
        "hmat": ("hrope", True, 3),
        "hmat-no-ma": ("hrope", False, 3),
        "hmat-rope1d": ("rope1d", True, 3),
        "flat": ("rope1d", False, 3),
        "id": ("rope1d", False, 1),
    }
    assert variant_config(base(), "id", n_items=N_ITEMS).codebook_size == N_ITEMS
    # The trunk is shared: only positions, mask and vocabulary may differ.
    trunk = ("n_layer", "hidden", "n_head", "n_kv_head", "ffn", "dropout", "max_items")
    for v in VARIANTS:
        c = variant_config(base(), v, n_items=N_ITEMS)
        assert all(getattr(c, f) == getattr(base(), f) for f in trunk)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_and_ranks(variant: str) -> None:
    cfg = variant_config(base(), variant, n_items=N_ITEMS)
    model = HMAT(cfg)
    users = users_for(cfg, variant)
    stream = build_stream(users, cfg.layout)
    loss = sft_loss(model, stream) + pt_loss(model, stream)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    cands = users_for(cfg, variant, n=1)[0].sids  # (N, k) rows of this variant's code table
    scored = build_stream([dataclasses.replace(u, candidates=cands) for u in users], cfg.layout)
    scores = rank_candidates(model.eval(), scored)
    assert scores.shape == (3, len(cands)) and bool(((scores > 0) & (scores < 1)).all())


def test_id_baseline_has_a_comparable_budget() -> None:
    """With as many item ids as code entries the two models have the same size; ML-100K is within 10%."""
    sid = HMAT(variant_config(hmat_cpu(), "hmat"))  # 6 x 256 = 1,536 code entries
    same = HMAT(variant_config(hmat_cpu(), "id", n_items=6 * 256))
    ml100k = HMAT(variant_config(hmat_cpu(), "id", n_items=1682))
    n = [sum(p.numel() for p in m.parameters()) for m in (sid, same, ml100k)]
    assert n[0] == n[1] and abs(n[2] - n[0]) / n[0] < 0.1


def test_id_codes_and_errors() -> None:
    assert id_codes(3).tolist() == [[0], [1], [2]]
    with pytest.raises(ValueError, match="n_items"):
        variant_config(base(), "id")
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config(base(), "hstu")
