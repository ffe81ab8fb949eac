"""The tokenizer of an item-cold split, and the guard that keeps splits from mixing.

A tokenizer for the split is fitted on the items with a training interaction only
(``recipes.coldstart.split.fit_items``): input statistics, k-means initialisation, weights
and the final refit never see a held-out item, which then gets its codes from its content
alone (behaviour missing -> imputed), as a new item does on ingestion. Its artifact records
the split (``item_cold_split`` in config.json), and so does every ranker checkpoint trained
on it (``run_meta``); ``check_split`` refuses a tokenizer or checkpoint of another split
(or of none), since a model that trained on a held-out item's interactions would make its
cold-start figures a lie.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data import Dataset
from models.tokenizer import FrozenTokenizer
from recipes.coldstart.split import SplitRecord, fit_items
from recipes.tokenizer.train import TrainConfig

SPLIT_KEY = "item_cold_split"


class SplitMismatch(ValueError):
    """A tokenizer or checkpoint belongs to another item-cold split than the job's."""


def describe(record: SplitRecord | None) -> str:
    if record is None:
        return "no item-cold split"
    return f"item-cold split share {record.share:g} seed {record.seed} ({record.held_out} items, {record.fingerprint})"


def check_split(what: str, found: dict[str, Any] | None, expected: SplitRecord | None) -> None:
    """``SplitMismatch`` naming ``what`` unless the recorded split equals the job's."""
    record = SplitRecord.from_dict(found)
    if record != expected:
        hint = (
            f" (pass --item-cold-share {expected.share:g} --item-cold-seed {expected.seed} to the job that made it)"
            if expected is not None
            else ""
        )
        raise SplitMismatch(f"{what} was made on {describe(record)}, this job runs on {describe(expected)}{hint}")


def tokenizer_split(path: str | Path) -> dict[str, Any] | None:
    """The split recorded in a tokenizer artifact's config.json (None: fitted on a whole dataset)."""
    meta = json.loads((Path(path) / "config.json").read_text())
    return meta.get(SPLIT_KEY)


def train_split_tokenizer(
    name: str,
    split: Dataset,
    record: SplitRecord,
    out_root: Path,
    cfg: TrainConfig,
    overrides: dict | None = None,
) -> FrozenTokenizer:
    """Train tokenizer variant ``name`` on the split's warm items only and record the split in the artifact."""
    from recipes.tokenizer.variants import train_variant

    return train_variant(
        name, split, out_root, cfg, overrides, fit_items=fit_items(split), extra={SPLIT_KEY: record.to_dict()}
    )
