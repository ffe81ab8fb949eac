"""SFT and PT objectives (models/hmat/losses.py, docs/method.md §3 "Losses")."""

from __future__ import annotations

import math

import pytest
import torch

from models.hmat.losses import pt_loss, sft_loss
from models.hmat.model import HMAT, HMATConfig
from models.hmat.sequence import TokenStream, UserSequence, build_stream
from models.hmat.testing import tiny_config


def synthetic_batch(cfg: HMATConfig, n_users: int) -> TokenStream:
    """Positive iff the item's first semantic ID is in the lower half of codebook 0: learnable from the anchor."""
    users = []
    for b in range(n_users):
        n_items = 2 + b % 5
        sids = torch.randint(cfg.codebook_size, (n_items, cfg.n_sid))
        actions = (sids[:, 0] < cfg.codebook_size // 2).long()
        users.append(UserSequence(profile=[b % cfg.profile_vocab_size], sids=sids, actions=actions))
    return build_stream(users, cfg.layout)


@pytest.mark.parametrize("loss_fn", [sft_loss, pt_loss], ids=["sft", "pt"])
def test_loss_is_finite_and_backpropagates(loss_fn) -> None:
    cfg = tiny_config()
    model = HMAT(cfg)
    loss = loss_fn(model, synthetic_batch(cfg, 3))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_initial_losses_are_near_chance() -> None:
    cfg = tiny_config()
    model = HMAT(cfg)
    batch = synthetic_batch(cfg, 4)
    with torch.no_grad():
        sft, pt = sft_loss(model, batch).item(), pt_loss(model, batch).item()
    assert sft == pytest.approx(math.log(2.0), abs=0.05)
    assert pt == pytest.approx(math.log(cfg.vocab_size), abs=0.2)


def test_empty_history_has_zero_sft_loss_with_gradient_graph() -> None:
    cfg = tiny_config()
    loss = sft_loss(HMAT(cfg), build_stream([UserSequence(profile=[1, 2])], cfg.layout))
    assert loss.detach().item() == 0.0 and loss.requires_grad


def test_candidates_are_rejected_in_training() -> None:
    cfg = tiny_config()
    s = build_stream([UserSequence(candidates=[[0, 0, 0]])], cfg.layout)
    with pytest.raises(ValueError, match="candidates"):
        sft_loss(HMAT(cfg), s)


def test_a_few_steps_reduce_sft_loss() -> None:
    cfg = tiny_config()
    model = HMAT(cfg)
    batch = synthetic_batch(cfg, 8)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = sft_loss(model, batch).item()
    for _ in range(8):
        optimiser.zero_grad()
        sft_loss(model, batch).backward()
        optimiser.step()
    with torch.no_grad():
        after = sft_loss(model, batch).item()
    assert after < 0.7 * before
