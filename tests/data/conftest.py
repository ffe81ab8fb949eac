"""Fixtures for the dataset layer: a shared real-data directory and tiny synthetic datasets."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Where real datasets are built: $HISAM_DATA_DIR, else <repo>/data (git-ignored).

    Session-scoped and persistent so the whole suite (and later runs) fetch and embed
    ML-100K once; the loader's caches make every later load cheap.
    """
    return Path(os.environ.get("HISAM_DATA_DIR", REPO / "data"))


def synthetic_interactions(n_users: int = 12, n_items: int = 9, n: int = 120, seed: int = 0) -> pd.DataFrame:
    """Random interactions with deliberately tied timestamps (to exercise the stable sort)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in rng.integers(0, n_users, n)],
            "item_id": [f"i{i}" for i in rng.integers(0, n_items, n)],
            "rating": rng.integers(1, 6, n).astype(float),
            "timestamp": 1_600_000_000 + rng.integers(0, n // 2, n) * 60,
        }
    )


@pytest.fixture
def write_custom(tmp_path: Path) -> Callable[..., Path]:
    """Write a dataset directory in the custom format; returns its path.

    ``embeddings`` maps modality -> (ids, matrix); ``items``/``users`` are written only
    when given, so tests can exercise the optional files.
    """

    def write(
        interactions: pd.DataFrame | None = None,
        items: pd.DataFrame | None = None,
        users: pd.DataFrame | None = None,
        embeddings: dict[str, tuple[list[str], np.ndarray]] | None = None,
        name: str = "toy",
    ) -> Path:
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        (synthetic_interactions() if interactions is None else interactions).to_csv(
            root / "interactions.csv", index=False
        )
        if items is not None:
            items.to_csv(root / "items.csv", index=False)
        if users is not None:
            users.to_csv(root / "users.csv", index=False)
        for modality, (ids, matrix) in (embeddings or {}).items():
            (root / "item_embeddings").mkdir(exist_ok=True)
            np.savez(root / "item_embeddings" / f"{modality}.npz", ids=np.array(ids, dtype=str), embeddings=matrix)
        return root

    return write


@pytest.fixture
def toy_interactions() -> pd.DataFrame:
    return synthetic_interactions()
