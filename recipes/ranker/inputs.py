"""What every ranker job needs before it builds a model: item codes, profiles, the model config.

Item codes come from the frozen tokenizer for the semantic-ID variants (the DST is frozen
while the ranker trains, docs/method.md §1 "Lifecycle") and are item indices for the ID
baseline. The tokenizer version travels into every checkpoint, and evaluation refuses a
checkpoint whose version differs from the tokenizer it is given: codes from another
tokenizer would be silently meaningless to the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import Dataset
from features.profiles import ProfileVocab
from models.hmat.baselines import id_codes, uses_item_ids, variant_config
from models.hmat.model import HMATConfig, hmat_cpu, hmat_large, hmat_small
from models.tokenizer import FrozenTokenizer

PRESETS: dict[str, Callable[[], HMATConfig]] = {"cpu": hmat_cpu, "small": hmat_small, "large": hmat_large}
ITEM_ID_VERSION = "item-id"  # the "tokenizer version" of the ID baseline's codes


@dataclass
class RankerInputs:
    """A dataset with its item codes (N, k), profile ids (U, P) and where the codes came from."""

    dataset: Dataset
    item_codes: np.ndarray
    codebook_size: int
    vocab: ProfileVocab
    profiles: np.ndarray
    tokenizer_version: str


def semantic_codes(ds: Dataset, tokenizer: FrozenTokenizer) -> np.ndarray:
    """(N, L) local codes in [0, K) of every item, collisions resolved within the catalogue.

    ``taken=[]`` turns on the tokenizer's collision rule, so two items never share a full
    ID (docs/method.md §1b "codebook hygiene"): the ranker could not tell them apart otherwise.
    """
    names = [m for m in tokenizer.modalities if m in ds.items.features]
    features = {m: ds.items.features[m] for m in names}
    present = {m: ds.items.present[m] for m in names}
    tokens = tokenizer.encode_batch(features, present, taken=[])
    return (tokens - tokenizer.token_offsets[None, :]).astype(np.int64)


def load_inputs(
    ds: Dataset,
    variant: str,
    tokenizer_dir: str | Path | None,
    vocab: ProfileVocab | None = None,
) -> RankerInputs:
    """Codes for ``variant`` (tokenizer for SID variants, item ids for ``id``) and profiles.

    ``vocab``: a saved profile vocabulary (from a checkpoint); fitted on ``ds.users`` if None.
    """
    vocab = vocab or ProfileVocab.fit(ds.users)
    if uses_item_ids(variant):
        codes, k_size, version = id_codes(ds.n_items), ds.n_items, ITEM_ID_VERSION
    else:
        if tokenizer_dir is None:
            raise ValueError(f"variant {variant!r} reads semantic IDs: pass a tokenizer directory")
        tokenizer = FrozenTokenizer.load(tokenizer_dir)
        codes, k_size, version = semantic_codes(ds, tokenizer), tokenizer.codebook_size, tokenizer.version
    return RankerInputs(ds, codes, k_size, vocab, vocab.encode(ds.users), version)


def model_config(preset: str, variant: str, inputs: RankerInputs, max_items: int) -> HMATConfig:
    """The preset's trunk with this data's vocabulary (codes, profile) and the variant's flags."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    base = dataclasses.replace(
        PRESETS[preset](),
        n_sid=inputs.item_codes.shape[1],
        codebook_size=inputs.codebook_size,
        profile_vocab_size=max(1, inputs.vocab.size),
        max_profile_len=max(1, inputs.vocab.n_tokens),
        max_items=max_items,
    )
    return variant_config(base, variant, n_items=inputs.dataset.n_items)


def select_users(ds: Dataset, max_users: int | None) -> np.ndarray | None:
    """The first ``max_users`` user indices (a deterministic slice for smoke runs), or None for all."""
    return None if max_users is None else np.arange(min(max_users, ds.n_users), dtype=np.int64)


def run_dir(out_dir: str | Path, variant: str, seed: int) -> Path:
    """Where one (variant, seed) run keeps its ``pretrain`` and ``finetune`` checkpoints."""
    return Path(out_dir) / variant / f"seed{seed}"
