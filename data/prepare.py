"""Build a custom dataset's missing item modalities from its raw files (``hisam data prepare``).

A dataset directory (data/FORMAT.md) may hold only ``interactions.csv`` and an
``items.csv`` with titles and attributes. Its ``dataset.json`` (written by ``hisam data
prepare``, or by hand) declares which modalities to build and from which columns:

- ``text``: the ``text_columns`` of ``items.csv`` joined into one text per item
  ("<title>. Genres: a, b. Description: ...") and embedded by the packaged sentence
  encoder (data.text), in batches, cached chunk by chunk by content, on the GPU when present;
- ``behaviour``: item2vec (data.behaviour) over the *training* split only;
- ``metadata``: the ``categorical`` (one-hot or hashed) and ``numeric`` (standardised)
  columns (data.metadata.table_features).

A modality that already has ``item_embeddings/<modality>.npz`` is read from that file
and never built: precomputed files take precedence, modality by modality. Without a
``dataset.json`` nothing is built (the format's original meaning: the files are all there
is). ``drop_unknown_items`` / ``drop_unknown_users`` drop interactions whose item (user) is
missing from ``items.csv`` (``users.csv``) instead of refusing the dataset; the dropped
rows are counted in the dataset's summary.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from data.dataset import DatasetError

log = logging.getLogger(__name__)

SPEC_FILE = "dataset.json"
MODALITIES = ("text", "behaviour", "metadata")
# Defaults, resolved against the columns items.csv has: the title first, then these when present.
DEFAULT_TEXT_EXTRA = ("description", "tags", "categories", "category", "genres", "genre")
DEFAULT_CATEGORICAL = ("categories", "category", "genres", "genre", "tags", "brand")


@dataclass(frozen=True)
class PrepareSpec:
    """What to build and from which columns; ``None`` column lists mean "the defaults present"."""

    build: tuple[str, ...] = MODALITIES
    text_columns: tuple[str, ...] | None = None
    categorical: tuple[str, ...] | None = None
    numeric: tuple[str, ...] = ()
    multi_value_separator: str = "|"
    max_one_hot: int = 256
    hash_buckets: int = 64
    drop_unknown_items: bool = False
    drop_unknown_users: bool = False
    timings: dict[str, float] = field(default_factory=dict, compare=False, repr=False)  # filled by the build

    def __post_init__(self) -> None:
        unknown = [m for m in self.build if m not in MODALITIES]
        if unknown:
            raise DatasetError(f"{SPEC_FILE}: build: unknown modality {unknown[0]!r} (expected some of {MODALITIES})")
        if self.max_one_hot < 1 or self.hash_buckets < 1:
            raise DatasetError(f"{SPEC_FILE}: max_one_hot and hash_buckets must be at least 1")

    def resolved(self, item_columns: list[str]) -> PrepareSpec:
        """The spec with default column lists replaced by the columns ``items.csv`` has."""
        cols = [c for c in item_columns if c != "item_id"]
        text = self.text_columns
        if text is None:
            text = tuple(c for c in ("title", *DEFAULT_TEXT_EXTRA) if c in cols)
        cat = self.categorical
        if cat is None:
            cat = tuple(c for c in DEFAULT_CATEGORICAL if c in cols)
        return replace(self, text_columns=tuple(text), categorical=tuple(cat))

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("timings")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def read_spec(root: Path) -> PrepareSpec | None:
    """``root/dataset.json`` as a spec, or None when the file does not exist."""
    path = root / SPEC_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not a readable JSON file: {e}") from e
    return spec_from_dict(raw, str(path))


def spec_from_dict(raw: object, source: str = SPEC_FILE) -> PrepareSpec:
    if not isinstance(raw, dict):
        raise DatasetError(f"{source}: expected a JSON object")
    known = {f.name for f in fields(PrepareSpec)} - {"timings"}
    extra = sorted(set(raw) - known)
    if extra:
        raise DatasetError(f"{source}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")
    kwargs: dict[str, object] = {}
    for k, v in raw.items():
        if k in ("build", "text_columns", "categorical", "numeric"):
            if v is None and k in ("text_columns", "categorical"):
                kwargs[k] = None
                continue
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise DatasetError(f"{source}: {k} must be a list of column names (strings)")
            kwargs[k] = tuple(v)
        elif k in ("drop_unknown_items", "drop_unknown_users"):
            if not isinstance(v, bool):
                raise DatasetError(f"{source}: {k} must be true or false")
            kwargs[k] = v
        elif k in ("max_one_hot", "hash_buckets"):
            if not isinstance(v, int) or isinstance(v, bool):
                raise DatasetError(f"{source}: {k} must be an integer")
            kwargs[k] = v
        else:  # multi_value_separator
            if not isinstance(v, str):
                raise DatasetError(f'{source}: {k} must be a string ("" for single-valued cells)')
            kwargs[k] = v
    return PrepareSpec(**kwargs)  # type: ignore[arg-type]


def write_spec(root: Path, spec: PrepareSpec) -> Path:
    path = root / SPEC_FILE
    try:
        path.write_text(json.dumps(spec.to_json(), indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot write the dataset spec: {e}") from e
    return path


def item_texts(items: pd.DataFrame, columns: tuple[str, ...], separator: str) -> tuple[list[str], np.ndarray]:
    """One text per item from ``columns`` (title first, bare; others as "Name: value."), and which have any.

    Multi-valued cells ("a|b") read "a, b". An item whose columns are all empty has no
    text (``has_text`` False) rather than an embedding of "".
    """
    n = len(items)
    missing = [c for c in columns if c not in items.columns]
    if missing:
        raise DatasetError(
            f"items.csv: text column {missing[0]!r} not found (has {', '.join(map(str, items.columns))})"
        )
    parts = pd.Series([""] * n, dtype="string")
    for c in columns:
        cell = items[c].astype("string").str.strip().reset_index(drop=True)
        if separator:
            cell = cell.str.split(separator, regex=False).map(
                lambda vs: ", ".join(v.strip() for v in vs if v.strip()), na_action="ignore"
            )
        cell = cell.fillna("")
        prefix = "" if c == "title" else c[:1].upper() + c[1:].replace("_", " ") + ": "
        ends = cell.str.endswith((".", "!", "?"))
        piece = (prefix + cell + ends.map({True: "", False: "."})).where(cell != "", "")
        parts = parts.str.cat(piece, sep=" ").str.strip()
    texts = parts.fillna("").tolist()
    has_text = np.array([t != "" for t in texts], dtype=bool)
    return texts, has_text


def build_modalities(
    items: pd.DataFrame,
    train: pd.DataFrame,
    spec: PrepareSpec,
    skip: set[str],
    cache_dir: Path,
    *,
    text_device: str = "auto",
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The modalities of ``spec.build`` not in ``skip`` (those have a precomputed file).

    ``items`` is items.csv (row = item index), ``spec`` already resolved against its
    columns; ``train`` the training split. Each stage's seconds land in ``spec.timings``.
    """
    from data.behaviour import Item2VecConfig, item2vec_cached
    from data.metadata import table_features
    from data.text import TEXT_DIM, embed_texts_chunked

    n = len(items)
    features: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    todo = [m for m in spec.build if m not in skip]
    for m in sorted(set(spec.build) & skip):
        log.info("modality %s: precomputed file found, not built", m)
    for m in todo:
        t0 = time.perf_counter()
        if m == "text":
            if not spec.text_columns:
                log.warning("modality text: no text columns (items.csv has no title); not built")
                continue
            texts, has_text = item_texts(items, spec.text_columns, spec.multi_value_separator)
            x = np.zeros((n, TEXT_DIM), dtype=np.float32)
            chosen = [texts[i] for i in np.flatnonzero(has_text)]
            log.info("modality text: %d items from columns %s", len(chosen), ", ".join(spec.text_columns))
            x[has_text] = embed_texts_chunked(chosen, cache_dir, device=text_device, progress=progress)
            features[m], present[m] = x, has_text
        elif m == "behaviour":
            features[m], present[m] = item2vec_cached(train, n, cache_dir, Item2VecConfig())
        else:
            if not spec.categorical and not spec.numeric:
                log.warning("modality metadata: no categorical or numeric columns declared; not built")
                continue
            x, p, names = table_features(
                items,
                spec.categorical or (),
                spec.numeric,
                separator=spec.multi_value_separator or None,
                max_one_hot=spec.max_one_hot,
                hash_buckets=spec.hash_buckets,
            )
            if x.shape[1] == 0 or not p.any():
                log.warning("modality metadata: the declared columns are empty; not built")
                continue
            log.info("modality metadata: %d columns from %s", len(names), ", ".join((*spec.categorical, *spec.numeric)))
            features[m], present[m] = x, p
        spec.timings[m] = time.perf_counter() - t0
        log.info("modality %s built in %.2fs", m, spec.timings[m])
    return features, present


def item_columns(root: Path) -> list[str]:
    """The header of ``root/items.csv`` ([] when there is none)."""
    path = root / "items.csv"
    if not path.is_file():
        return []
    try:
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a readable CSV file: {e}") from e
