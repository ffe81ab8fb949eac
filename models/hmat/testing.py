"""Small HMAT configurations and weights for tests and demos (no infrastructure)."""

from __future__ import annotations

import dataclasses

import torch

from models.hmat.model import HMAT, HMATConfig, hmat_cpu


def tiny_config(**changes: object) -> HMATConfig:
    """The CPU preset shrunk to a toy vocabulary: 3 codes of 16, 8 profile ids, 8 items."""
    base = dataclasses.replace(
        hmat_cpu(), n_sid=3, codebook_size=16, profile_vocab_size=8, max_items=8, max_profile_len=4
    )
    return dataclasses.replace(base, **changes)


def scrambled(model: HMAT, seed: int | None = None) -> HMAT:
    """Weights at a scale where attention patterns matter (the 0.02 init makes them nearly flat); eval mode."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()
