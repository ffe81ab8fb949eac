"""Small real tokenizers and synthetic multimodal items, for tests and demos.

The synthetic catalogue has known structure: every item has a shared latent factor that all
modalities see and one private factor per modality, each drawn from a few clusters, mixed
into each modality's embedding by a fixed random linear map plus noise. A tokenizer trained on
it is a real, trained model (not a mock); it is just small.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.tokenizer.artifact import FrozenTokenizer, build_model, save_tokenizer
from recipes.tokenizer.train import TrainConfig, train_tokenizer

TINY_MODALITIES = {"text": 24, "behaviour": 12, "metadata": 8}


def synthetic_items(
    n: int = 400, modalities: dict[str, int] | None = None, seed: int = 0, missing_rate: float = 0.0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(features, present, latents): ``latents`` has 'shared' and one private cluster id per modality."""
    modalities = modalities or TINY_MODALITIES
    rng = np.random.default_rng(seed)
    shared_k, private_k, dim_s, dim_p = 8, 4, 6, 3
    shared_c = rng.normal(size=(shared_k, dim_s)) * 2
    shared_id = rng.integers(shared_k, size=n)
    shared = shared_c[shared_id] + 0.3 * rng.normal(size=(n, dim_s))
    feats, present, latents = {}, {}, {"shared": shared_id}
    for m, width in modalities.items():
        priv_c = rng.normal(size=(private_k, dim_p)) * 2
        priv_id = rng.integers(private_k, size=n)
        priv = priv_c[priv_id] + 0.3 * rng.normal(size=(n, dim_p))
        mix = rng.normal(size=(dim_s + dim_p, width)) / np.sqrt(dim_s + dim_p)
        x = np.concatenate([shared, priv], 1) @ mix + 0.05 * rng.normal(size=(n, width))
        feats[m] = x.astype(np.float32)
        present[m] = np.ones(n, dtype=bool)
        latents[m] = priv_id
    if missing_rate > 0:
        names = list(modalities)
        for m in names[1:]:
            drop = rng.random(n) < missing_rate
            present[m] &= ~drop
            feats[m][drop] = 0.0
    return feats, present, latents


def tiny_config(kind: str = "dst", modalities: dict[str, int] | None = None) -> dict:
    modalities = dict(modalities or TINY_MODALITIES)
    base = {"modalities": modalities, "dim": 32, "hidden": 64, "codebook_size": 16}
    if kind == "dst":
        return {**base, "anchor": next(iter(modalities))}
    return base


def tiny_tokenizer(
    out_dir: str | Path,
    kind: str = "dst",
    modalities: dict[str, int] | None = None,
    n_items: int = 400,
    epochs: int = 20,
    seed: int = 0,
) -> FrozenTokenizer:
    """Train a small real tokenizer on synthetic items (a few seconds on CPU), save, load frozen."""
    feats, present, _ = synthetic_items(n_items, modalities, seed)
    model = build_model(kind, tiny_config(kind, modalities))
    train_tokenizer(
        model, feats, present, TrainConfig(epochs=epochs, batch_size=128, seed=seed, progress=False, warmup_steps=5)
    )
    save_tokenizer(model, out_dir)
    return FrozenTokenizer.load(out_dir)
