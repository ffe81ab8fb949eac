"""The item-cold-start split (docs/method.md §5, "Item cold start").

A seeded share of items loses every training interaction: they stay in the catalogue with
their content (text, metadata), exactly as a new item arrives on ingestion, and their test
rows stay, to be ranked against the other test rows of the same user.

Which items: the share is drawn among the items that have both training and test
interactions. An item with no test row would be held out for nothing (nothing would
measure it), and one with no training interaction is cold already (it stays cold in the
split, ``Dataset.cold_items`` of the split holds both kinds). The draw is
``numpy.random.default_rng(seed).choice`` over those items in index order, so a (dataset,
share, seed) triple always gives the same items.

What changes, so that nothing downstream can learn from a held-out item's interactions:

- ``train`` loses the held-out items' rows; ``test`` is the same rows in the same order;
  ``interactions`` is the reduced train followed by the test rows (the Dataset contract:
  ``train`` is ``interactions.iloc[:n_train]``, the index is the position), so every
  reader of ``ds.interactions[:len(ds.train)]`` (training sequences, eval histories) sees
  the reduced log;
- the behaviour modality is rebuilt from the reduced train with the dataset layer's own
  function (``data.behaviour.item2vec``, the width of the dataset's behaviour modality), so
  a held-out item has no behaviour vector (zero row, ``present`` False: the tokenizer
  imputes it from the item's other modalities, its documented fallback for a missing
  modality) and no other item's vector saw the removed co-occurrences;
- cold users and cold items are recomputed from the reduced train with the dataset
  layer's ``find_cold_users`` / ``find_cold_items``;
- a tokenizer for the split is fitted on the items with a training interaction only
  (``fit_items``; ``recipes.coldstart.tokenizer``); the ranker and the tokenizer record the
  split (``SplitRecord``) and the jobs refuse to mix a model of one split with another.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data import Dataset, ItemTable
from data.behaviour import Item2VecConfig, item2vec, item2vec_cached
from data.dataset import find_cold_items, find_cold_users

BEHAVIOUR = "behaviour"


@dataclass(frozen=True)
class SplitRecord:
    """What identifies a split: its parameters and a fingerprint of the held-out items (in checkpoints, artifacts)."""

    share: float
    seed: int
    held_out: int  # how many items were held out
    fingerprint: str  # sha256 (12 hex) of the sorted held-out item indices

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SplitRecord | None:
        return None if d is None else cls(float(d["share"]), int(d["seed"]), int(d["held_out"]), str(d["fingerprint"]))


def fingerprint(items: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.sort(items).astype(np.int64)).tobytes()).hexdigest()[:12]


def candidate_items(ds: Dataset) -> np.ndarray:
    """Items the split may hold out: those with training and test interactions, sorted."""
    in_train = np.unique(ds.train["item_idx"].to_numpy())
    in_test = np.unique(ds.test["item_idx"].to_numpy())
    return np.intersect1d(in_train, in_test).astype(np.int64)


def draw_held_out(ds: Dataset, share: float, seed: int) -> np.ndarray:
    """round(share * candidates) of :func:`candidate_items` (at least one when share > 0), seeded, sorted."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"item-cold share must be in (0, 1), got {share}")
    pool = candidate_items(ds)
    if len(pool) == 0:
        raise ValueError("no item has both training and test interactions: nothing to hold out")
    n = min(len(pool), max(1, round(share * len(pool))))
    return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False)).astype(np.int64)


def rebuild_behaviour(
    items: ItemTable, train: pd.DataFrame, cache_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The behaviour modality from ``train`` alone, at the width of the existing one ((N, D), (N,))."""
    config = Item2VecConfig(dim=int(items.features[BEHAVIOUR].shape[1]))
    if cache_dir is None:
        return item2vec(train, len(items), config)
    return item2vec_cached(train, len(items), cache_dir, config)


def item_cold_split(
    ds: Dataset, share: float = 0.2, seed: int = 0, *, behaviour_cache: str | Path | None = None
) -> tuple[Dataset, np.ndarray]:
    """(the split dataset, the held-out item indices sorted): see the module docstring.

    ``ds`` must be a whole dataset (``train`` and ``test`` partition ``interactions``);
    cut ``train`` in time (``--train-until``) after the split, not before.
    """
    n_train = len(ds.train)
    if n_train + len(ds.test) != len(ds.interactions) or not ds.train.index.equals(ds.interactions.index[:n_train]):
        raise ValueError("item_cold_split needs a whole dataset: train and test must partition interactions")
    held = draw_held_out(ds, share, seed)
    train = ds.train[~ds.train["item_idx"].isin(held)]
    interactions = pd.concat([train, ds.test]).reset_index(drop=True)
    new_train, test = interactions.iloc[: len(train)], interactions.iloc[len(train) :]
    items = ds.items
    if BEHAVIOUR in items.features:
        beh, present = rebuild_behaviour(items, new_train, behaviour_cache)
        items = dataclasses.replace(
            items,
            features={**items.features, BEHAVIOUR: beh},
            present={**items.present, BEHAVIOUR: present},
        )
    split = dataclasses.replace(
        ds,
        items=items,
        interactions=interactions,
        train=new_train,
        test=test,
        cold_users=find_cold_users(new_train, ds.n_users),
        cold_items=find_cold_items(new_train, ds.n_items),
    )
    return split, held


def split_record(share: float, seed: int, held_out: np.ndarray) -> SplitRecord:
    return SplitRecord(float(share), int(seed), len(held_out), fingerprint(held_out))


def split_for(
    ds: Dataset, share: float | None, seed: int = 0, *, behaviour_cache: str | Path | None = None
) -> tuple[Dataset, SplitRecord | None]:
    """The jobs' entry: ``ds`` unchanged (record None) when ``share`` is None, else its item-cold split."""
    if share is None:
        return ds, None
    split, held = item_cold_split(ds, share, seed, behaviour_cache=behaviour_cache)
    return split, split_record(share, seed, held)


def fit_items(ds: Dataset) -> np.ndarray:
    """Items a tokenizer may be fitted on: those with a training interaction (the split's warm items)."""
    return np.setdiff1d(np.arange(ds.n_items, dtype=np.int64), ds.cold_items)
