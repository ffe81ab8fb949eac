"""A tiny learnable recommendation dataset in the custom format, and a tokenizer for it.

Items carry the structured synthetic embeddings of ``recipes.tokenizer.testing`` (a shared
cluster seen by every modality); a user likes an item iff its shared cluster has the
user's parity, with 10% label noise, so both profile-free history and item codes carry
signal. Timestamps are laid out so that the global 90/10 split has cold users (users who
only start near the end) and cold items (items only shown near the end).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data import Dataset, load_dataset
from models.device import torch_threads
from models.tokenizer import FrozenTokenizer
from recipes.tokenizer.testing import TINY_MODALITIES, synthetic_items, tiny_tokenizer

N_USERS, N_ITEMS, LATE_USERS, LATE_ITEMS = 40, 60, 6, 4


def write_toy_dataset(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    features, _, latents = synthetic_items(N_ITEMS, TINY_MODALITIES, seed=seed)
    cluster = latents["shared"]
    rows = []
    for u in range(N_USERS):
        late = u >= N_USERS - LATE_USERS
        n = int(rng.integers(4, 8)) if late else int(rng.integers(12, 30))
        for _ in range(n):
            t = int(rng.integers(950, 1000)) if late else int(rng.integers(0, 1000))
            fresh = t > 960 and rng.random() < 0.4  # the last items only appear late
            i = (
                int(rng.integers(N_ITEMS - LATE_ITEMS, N_ITEMS))
                if fresh
                else int(rng.integers(0, N_ITEMS - LATE_ITEMS))
            )
            like = (cluster[i] % 2 == u % 2) ^ (rng.random() < 0.1)
            rows.append((f"u{u}", f"i{i}", 5.0 if like else 2.0, 1_700_000_000 + t * 60))
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_csv(
        root / "interactions.csv", index=False
    )
    pd.DataFrame({"item_id": [f"i{i}" for i in range(N_ITEMS)]}).to_csv(root / "items.csv", index=False)
    pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in range(N_USERS)],
            "age": [15 + 3 * u for u in range(N_USERS)],
            "gender": ["MF"[u % 2] for u in range(N_USERS)],
            "occupation": [["student", "writer", "other"][u % 3] for u in range(N_USERS)],
        }
    ).to_csv(root / "users.csv", index=False)
    (root / "item_embeddings").mkdir(exist_ok=True)
    ids = np.array([f"i{i}" for i in range(N_ITEMS)], dtype=str)
    for m, x in features.items():
        np.savez(root / "item_embeddings" / f"{m}.npz", ids=ids, embeddings=x)
    return root


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread) -> None:
    """Every ranker test module on one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("ranker") / "toy")


@pytest.fixture(scope="session")
def toy(toy_dir: Path) -> Dataset:
    return load_dataset(str(toy_dir))


@pytest.fixture(scope="session")
def toy_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ranker_tok") / "tok"
    with torch_threads(1):  # session fixtures are set up before the module-scoped one_thread
        tiny_tokenizer(out, modalities=TINY_MODALITIES, n_items=200, epochs=4)
    return out


@pytest.fixture(scope="session")
def toy_tokenizer(toy_tokenizer_dir: Path) -> FrozenTokenizer:
    return FrozenTokenizer.load(toy_tokenizer_dir)
