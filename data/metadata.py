"""Metadata modality: release year and genres as a small dense vector.

Layout (columns named by :func:`metadata_features`):
``year_z`` (year standardised over items with a known year; 0 where unknown),
``year_missing`` (1 where unknown, so the model can tell "average year" from "no year"),
one-hot decade (decades that occur in the data), genre multi-hot (genres that occur).
These are item attributes, not interactions, so computing the year statistics over all
items leaks nothing about the test split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
