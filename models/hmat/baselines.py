"""Baselines and ablations of HMAT as configurations of the same model (docs/method.md §5; Hi-SAM Table 2).

Every variant is ``HMAT`` with some flags changed, so trunk, width, depth, optimiser and
training budget are identical by construction and only the named difference is tested:

- ``hmat``: the method: H-RoPE, MA-Attn mask, semantic IDs.
- ``hmat-no-ma``: "w/o MA-Attn": plain causal mask (every earlier token visible).
- ``hmat-rope1d``: "1-D RoPE instead of H-RoPE": one flat position, MA-Attn kept.
- ``flat``: the flat semantic-ID transformer (the QARM / PSRQ family's ranker shape):
  semantic IDs, 1-D RoPE, plain causal mask.
- ``id``: an ID-based sequential transformer (SASRec / HSTU style): each item is ONE token,
  its own learned ID embedding (``n_sid = 1``, one "codebook" with an entry per item), then
  its anchor and action, as HSTU interleaves items and actions; 1-D RoPE, causal mask.
  Items unseen in training keep their random initial embedding, which is exactly the
  cold-item weakness semantic IDs are meant to fix.

The ID baseline's vocabulary has ``n_items`` item entries where the SID models have
``n_sid * K`` code entries (ML-100K: 1,682 vs 6 x 256 = 1,536), so the parameter budgets
also match to within a few percent.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.hmat.model import HMATConfig

VARIANTS: tuple[str, ...] = ("hmat", "hmat-no-ma", "hmat-rope1d", "flat", "id")


def uses_item_ids(variant: str) -> bool:
    """Whether the variant reads item IDs (``id_codes``) instead of semantic IDs."""
    _check(variant)
    return variant == "id"


def variant_config(base: HMATConfig, variant: str, n_items: int | None = None) -> HMATConfig:
    """``base`` with the variant's flags; ``n_items`` is required by (and only read for) ``id``.

    For the SID variants ``base`` must already carry the tokenizer's ``n_sid`` and
    ``codebook_size``; the ID variant replaces both.
    """
    _check(variant)
    if variant == "hmat":
        return dataclasses.replace(base)
    if variant == "hmat-no-ma":
        return dataclasses.replace(base, ma_attn=False)
    if variant == "hmat-rope1d":
        return dataclasses.replace(base, rope="rope1d")
    if variant == "flat":
        return dataclasses.replace(base, rope="rope1d", ma_attn=False)
    if n_items is None or n_items < 1:
        raise ValueError(f"variant 'id' needs the number of items, got n_items={n_items}")
    return dataclasses.replace(base, n_sid=1, codebook_size=n_items, rope="rope1d", ma_attn=False)


def id_codes(n_items: int) -> np.ndarray:
    """(N, 1) "codes" of the ID baseline: item i is code i of its single codebook."""
    return np.arange(n_items, dtype=np.int64)[:, None]


def _check(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
