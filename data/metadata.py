"""Metadata modality: item attributes as a small dense vector.

Two builders. :func:`table_features` is the general one (bring-your-own data, declared
columns of ``items.csv``): categorical columns one-hot (multi-hot when a cell holds several
values), hashed into a fixed number of buckets when a column has too many distinct values;
numeric columns standardised, with a missing flag. :func:`metadata_features` is ML-100K's:

ML-100K layout (columns named by :func:`metadata_features`):
``year_z`` (year standardised over items with a known year; 0 where unknown),
``year_missing`` (1 where unknown, so the model can tell "average year" from "no year"),
one-hot decade (decades that occur in the data), genre multi-hot (genres that occur).
These are item attributes, not interactions, so computing the year statistics over all
items leaks nothing about the test split.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd

from data.dataset import DatasetError


def metadata_features(
    years: Sequence[int | None], genres: Sequence[Sequence[str]]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """((N, D) float32 features, (N,) bool present, D column names).

    ``present`` is False only where an item has neither a year nor a genre: its row is
    then all zeros (including ``year_missing``), as for every other missing modality.
    """
    n = len(years)
    if len(genres) != n:
        raise ValueError(f"years ({n}) and genres ({len(genres)}) differ in length")
    known = np.array([y is not None for y in years], dtype=bool)
    year = np.array([y if y is not None else 0 for y in years], dtype=np.float64)
    decades = sorted({int(y) // 10 * 10 for y in year[known]})
    vocab = sorted({g for gs in genres for g in gs})
    cols = ["year_z", "year_missing"] + [f"decade_{d}s" for d in decades] + [f"genre_{g}" for g in vocab]
    x = np.zeros((n, len(cols)), dtype=np.float32)
    if known.any():
        mu, sd = year[known].mean(), year[known].std()
        x[known, 0] = (year[known] - mu) / (sd if sd > 0 else 1.0)
    x[~known, 1] = 1.0
    d_col = {d: 2 + i for i, d in enumerate(decades)}
    g_col = {g: 2 + len(decades) + i for i, g in enumerate(vocab)}
    for i in np.flatnonzero(known):
        x[i, d_col[int(year[i]) // 10 * 10]] = 1.0
    for i, gs in enumerate(genres):
        for g in gs:
            x[i, g_col[g]] = 1.0
    present = known | np.array([len(gs) > 0 for gs in genres], dtype=bool)
    x[~present] = 0.0
    return x, present, cols


def _categorical_pairs(values: pd.Series, separator: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(row, value) pairs of a categorical column; a cell "a|b" gives two pairs with ``separator`` "|"."""
    cells = values.astype("string")
    parts = cells.str.split(separator, regex=False) if separator else cells.map(lambda v: [v], na_action="ignore")
    exploded = parts.explode().dropna().str.strip()
    exploded = exploded[exploded != ""]
    return exploded.index.to_numpy(np.int64), exploded.to_numpy(dtype=object)


def table_features(
    table: pd.DataFrame,
    categorical: Sequence[str],
    numeric: Sequence[str],
    *,
    separator: str | None = "|",
    max_one_hot: int = 256,
    hash_buckets: int = 64,
    source: str = "items.csv",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """((N, D) float32 features, (N,) bool present, D column names) from declared item columns.

    - a categorical column with at most ``max_one_hot`` distinct values: one column per value
      (``genre=Drama``), 1 where the item has it; with more, ``hash_buckets`` columns
      (``genre#17``) indexed by a stable hash (CRC-32) of the value, so the width stays fixed
      however large the catalogue;
    - a numeric column: ``year_z``, standardised over the items that have a value, 0 where
      missing, plus ``year_missing`` (1 where missing) when any value is missing.

    An item with no category and no number is not present (zero row). Attributes are not
    interactions, so statistics over all items leak nothing about the test split.
    """
    n = len(table)
    table = table.reset_index(drop=True)
    for c in (*categorical, *numeric):
        if c not in table.columns:
            raise DatasetError(f"{source}: metadata column {c!r} not found (has {', '.join(map(str, table.columns))})")
    blocks: list[np.ndarray] = []
    names: list[str] = []
    present = np.zeros(n, dtype=bool)
    for c in numeric:
        raw = table[c]
        values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)
        known = np.isfinite(values)
        given = raw.notna().to_numpy() & (raw.astype("string").str.strip() != "").fillna(False).to_numpy(bool)
        bad = given & ~known
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DatasetError(
                f"{source}: column {c}, row {row + 2}: {str(raw.iloc[row])!r} is not a finite number "
                "(declared numeric; leave the cell empty for a missing value)"
            )
        block = np.zeros((n, 2 if (~known).any() else 1), dtype=np.float32)
        if known.any():
            mu, sd = values[known].mean(), values[known].std()
            block[known, 0] = (values[known] - mu) / (sd if sd > 0 else 1.0)
        names.append(f"{c}_z")
        if block.shape[1] == 2:
            block[~known, 1] = 1.0
            names.append(f"{c}_missing")
        blocks.append(block)
        present |= known
    for c in categorical:
        rows, values = _categorical_pairs(table[c], separator)
        vocab = sorted(set(values.tolist()))
        if len(vocab) <= max_one_hot:
            col_of = {v: i for i, v in enumerate(vocab)}
            cols = np.array([col_of[v] for v in values], dtype=np.int64)
            names.extend(f"{c}={v}" for v in vocab)
            width = len(vocab)
        else:
            bucket_of = {v: zlib.crc32(f"{c}={v}".encode()) % hash_buckets for v in vocab}
            cols = np.array([bucket_of[v] for v in values], dtype=np.int64)
            names.extend(f"{c}#{b}" for b in range(hash_buckets))
            width = hash_buckets
        block = np.zeros((n, width), dtype=np.float32)
        block[rows, cols] = 1.0
        blocks.append(block)
        present[rows] = True
    x = np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0), dtype=np.float32)
    x[~present] = 0.0
    return x, present, names
