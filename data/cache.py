"""On-disk caches of derived arrays (text and behaviour embeddings).

Several jobs (and test workers) may build the same dataset at once in one data
directory, so a cache file is written under a unique temporary name and renamed into
place: readers see either no file or a complete one, never a half-written array.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` (.npy) atomically; the directory is created if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cached_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The float32 array cached at ``path`` if it exists and has ``shape``, else None.

    An unreadable or mis-shaped file is treated as a miss (and overwritten by the caller)
    rather than an error: a cache must never be the reason a build fails.
    """
    if not path.exists():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable cache file %s: %s", path, e)
        return None
    if array.shape != shape or array.dtype != np.float32:
        log.warning("ignoring cache file %s: %s %s, expected float32 %s", path, array.dtype, array.shape, shape)
        return None
    return array
