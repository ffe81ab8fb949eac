"""Bring-your-own dataset: a directory of CSV files plus one embedding file per modality.

The format (also in ``data/FORMAT.md``, which has a worked example)::

    <dir>/
      interactions.csv          required; columns user_id,item_id,rating,timestamp[,label]
      items.csv                 optional; columns item_id[,title][,any others]
      users.csv                 optional; columns user_id[,any profile columns]
      item_embeddings/          optional; one file per modality
        <modality>.npz          arrays "ids" (M,) str and "embeddings" (M, D) float

- Ids are strings, compared exactly; an empty id is an error.
- ``rating`` is a finite number. ``label`` (0/1) overrides the default rule rating > 3.
- ``timestamp`` is integer epoch seconds, or ISO-8601 date-times (converted to UTC).
- Items are the rows of ``items.csv`` in file order; without ``items.csv``, the items of
  ``interactions.csv`` in order of first appearance. Users likewise. When ``items.csv``
  (``users.csv``) exists, an interaction with an item (user) it lacks is an error.
- ``<modality>.npz``: the modality is named by the file stem (letters, digits, ``_``,
  ``-``). Every id must be a known item, at most once; values must be finite. Items
  missing from the file get a zero row and ``present[modality] = False``.
- The split and the cold sets are those of every hisam dataset (``data.dataset``).
- ``<dir>/dataset.json`` (optional; data.prepare): modalities to build from the raw files
  (text, behaviour, metadata) where no ``.npz`` gives them, and whether to drop
  interactions with unknown items or users instead of refusing them.

One ``.npz`` per modality (rather than a matrix plus a separate id list) keeps ids and
rows in one file, so they cannot drift apart. Write one with
``np.savez(path, ids=np.array(ids, dtype=str), embeddings=matrix)``; object arrays are
refused because loading them would need pickle, which can execute code.
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from data.dataset import Dataset, DatasetError, ItemTable, assemble, prepare_interactions, split_chronological
from data.prepare import PrepareSpec, build_modalities

log = logging.getLogger(__name__)

INTERACTIONS_FILE = "interactions.csv"
ITEMS_FILE = "items.csv"
USERS_FILE = "users.csv"
EMBEDDINGS_DIR = "item_embeddings"
INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
_MODALITY_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _read_csv(path: Path, id_columns: tuple[str, ...], required: tuple[str, ...]) -> pd.DataFrame:
    """Read a CSV with ids as exact strings ("007" stays "007"); check columns and empty ids."""
    try:
        df = pd.read_csv(path, dtype={c: str for c in id_columns}, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError as e:
        raise DatasetError(f"{path}: file is empty (expected a header with columns {', '.join(required)})") from e
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a readable CSV file: {e}") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))})")
    for c in id_columns:
        bad = df[c].isna() | (df[c].astype(str).str.strip() == "")
        if bad.any():
            raise DatasetError(f"{path}: row {_line(bad)} has an empty {c}")
    return df


def _line(mask: pd.Series | np.ndarray) -> int:
    """1-based line number in the CSV (header is line 1) of the first True in ``mask``."""
    return int(np.flatnonzero(np.asarray(mask))[0]) + 2


def _check_unique(df: pd.DataFrame, column: str, path: Path) -> None:
    dup = df[column].duplicated()
    if dup.any():
        raise DatasetError(f"{path}: duplicate {column} {df[column][dup].iloc[0]!r} at row {_line(dup)}")


def _numeric(df: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(
            f"{path}: column {column}, row {row + 2}: {str(df[column].iloc[row])!r} is not a finite number"
        )
    return values


def _timestamps(df: pd.DataFrame, path: Path) -> np.ndarray:
    """Epoch seconds from numbers, or from ISO-8601 strings when the column is not numeric."""
    col = df["timestamp"]
    numbers = pd.to_numeric(col, errors="coerce").to_numpy(np.float64)
    finite = np.isfinite(numbers)
    if finite.all():
        return np.floor(numbers).astype(np.int64)
    if finite.any():
        row = int(np.flatnonzero(~finite)[0])
        raise DatasetError(
            f"{path}: column timestamp, row {row + 2}: {str(col.iloc[row])!r} is not epoch seconds like the other rows"
        )
    parsed = pd.to_datetime(col.astype(str), utc=True, errors="coerce", format="ISO8601")
    if parsed.isna().any():
        row = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise DatasetError(
            f"{path}: column timestamp, row {row + 2}: {str(col.iloc[row])!r} is neither epoch seconds nor ISO-8601"
        )
    return (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy().astype(np.int64)


def _index(
    ids: pd.Series, known: dict[str, int], what: str, path: Path, source: str, drop: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(index of each id, mask of the rows whose id is known). An unknown id is an error unless ``drop``."""
    idx = ids.map(known)
    unknown = idx.isna().to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        if not drop:
            flag = "--drop-unknown-items" if what == "item_id" else "--drop-unknown-users"
            raise DatasetError(
                f"{path}: row {row + 2}: {what} {ids.iloc[row]!r} is not in {source} "
                f"(hisam data prepare {flag} drops such rows instead)"
            )
        log.warning("%s: dropping %d interaction(s) whose %s is not in %s (first: %r at row %d)",
                    path, int(unknown.sum()), what, source, ids.iloc[row], row + 2)  # fmt: skip
    return idx.fillna(-1).to_numpy(np.int64), ~unknown


def _first_seen(ids: pd.Series) -> list[str]:
    return list(dict.fromkeys(ids.tolist()))


def read_embeddings(path: Path, row_of: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """One ``<modality>.npz`` -> ((N, D) float32 with zero rows where absent, (N,) bool present)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:  # object arrays need pickle
        raise DatasetError(f"{path}: cannot be read without pickle ({e}); save ids as np.array(ids, dtype=str)") from e
    except (OSError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: not a readable .npz file: {e}") from e
    missing = [k for k in ("ids", "embeddings") if k not in arrays]
    if missing:
        raise DatasetError(f"{path}: missing array(s) {', '.join(missing)} (has {', '.join(arrays) or 'none'})")
    ids, emb = arrays["ids"], arrays["embeddings"]
    if ids.ndim != 1 or ids.dtype.kind not in "US":
        raise DatasetError(f"{path}: ids must be a 1-D string array, got {ids.dtype} {ids.shape}")
    if emb.ndim != 2 or emb.dtype.kind not in "fiu":
        raise DatasetError(f"{path}: embeddings must be a 2-D numeric array, got {emb.dtype} {emb.shape}")
    if emb.shape[0] != ids.shape[0]:
        raise DatasetError(f"{path}: {ids.shape[0]} ids but {emb.shape[0]} embedding rows")
    ids_list = [i.decode() if isinstance(i, bytes) else str(i) for i in ids.tolist()]
    seen: set[str] = set()
    for r, i in enumerate(ids_list):
        if i in seen:
            raise DatasetError(f"{path}: duplicate id {i!r} at row {r}")
        seen.add(i)
        if i not in row_of:
            raise DatasetError(f"{path}: row {r}: id {i!r} is not a known item")
    emb = emb.astype(np.float32)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        r = int(np.flatnonzero(~finite)[0])
        raise DatasetError(f"{path}: row {r} (id {ids_list[r]!r}) has NaN or inf values")
    rows = np.array([row_of[i] for i in ids_list], dtype=np.int64)
    out = np.zeros((len(row_of), emb.shape[1]), dtype=np.float32)
    present = np.zeros(len(row_of), dtype=bool)
    out[rows] = emb
    present[rows] = True
    return out, present


def load_custom(
    path: str | Path,
    *,
    spec: PrepareSpec | None = None,
    cache_dir: str | Path | None = None,
    text_device: str = "auto",
    progress: bool = True,
) -> Dataset:
    """Load a dataset directory in the format of the module docstring (and FORMAT.md).

    With a ``spec`` (data.prepare; ``load_dataset`` passes the directory's ``dataset.json``),
    the modalities it declares and no ``.npz`` provides are built from the raw files, their
    caches under ``cache_dir`` (default ``<dir>/.hisam-cache``), and unknown items or users
    may be dropped instead of refused.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    inter_path = root / INTERACTIONS_FILE
    if not inter_path.is_file():
        raise DatasetError(f"{inter_path}: required file is missing (see data/FORMAT.md)")
    inter = _read_csv(inter_path, ("user_id", "item_id"), INTERACTION_COLUMNS)
    if len(inter) == 0:
        raise DatasetError(f"{inter_path}: no interactions")

    items_path = root / ITEMS_FILE
    if items_path.is_file():
        items_df = _read_csv(items_path, ("item_id",), ("item_id",))
        _check_unique(items_df, "item_id", items_path)
        item_ids = items_df["item_id"].tolist()
        item_source = f"{items_path}"
    else:
        item_ids = _first_seen(inter["item_id"])
        items_df = pd.DataFrame({"item_id": item_ids})
        item_source = "the item list"
    users_path = root / USERS_FILE
    if users_path.is_file():
        users_df = _read_csv(users_path, ("user_id",), ("user_id",))
        _check_unique(users_df, "user_id", users_path)
        user_source = f"{users_path}"
    else:
        users_df = pd.DataFrame({"user_id": _first_seen(inter["user_id"])})
        user_source = "the user list"
    row_of = {e: i for i, e in enumerate(item_ids)}
    user_of = {e: i for i, e in enumerate(users_df["user_id"])}

    label = None
    if "label" in inter.columns:
        label = _numeric(inter, "label", inter_path)
        bad = ~np.isin(label, (0.0, 1.0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DatasetError(
                f"{inter_path}: column label, row {row + 2}: {str(inter['label'].iloc[row])!r} is not 0 or 1"
            )
    user_idx, user_ok = _index(
        inter["user_id"], user_of, "user_id", inter_path, user_source, drop=spec is not None and spec.drop_unknown_users
    )
    item_idx, item_ok = _index(
        inter["item_id"], row_of, "item_id", inter_path, item_source, drop=spec is not None and spec.drop_unknown_items
    )
    dropped = {"unknown item": int((~item_ok).sum()), "unknown user": int((item_ok & ~user_ok).sum())}
    keep = item_ok & user_ok
    if not keep.any():
        raise DatasetError(f"{inter_path}: no interaction left after dropping unknown items and users")
    interactions = prepare_interactions(
        user_idx=user_idx[keep],
        item_idx=item_idx[keep],
        rating=_numeric(inter, "rating", inter_path)[keep],
        timestamp=_timestamps(inter, inter_path)[keep],
        label=None if label is None else label[keep],
    )

    features: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    emb_dir = root / EMBEDDINGS_DIR
    if emb_dir.is_dir():
        for f in sorted(emb_dir.iterdir()):
            if f.name.startswith(".") or f.is_dir():
                continue
            if f.suffix != ".npz" or not _MODALITY_NAME.fullmatch(f.stem):
                raise DatasetError(f"{f}: expected <modality>.npz with a name of letters, digits, '_' or '-'")
            features[f.stem], present[f.stem] = read_embeddings(f, row_of)
            log.info("%s: modality %s, dim %d, %d/%d items", root.name, f.stem,
                     features[f.stem].shape[1], int(present[f.stem].sum()), len(item_ids))  # fmt: skip

    if spec is not None:
        spec = spec.resolved(items_df.columns.tolist())
        train, _ = split_chronological(interactions)
        built, built_present = build_modalities(
            items_df.reset_index(drop=True),
            train,
            spec,
            set(features),
            Path(cache_dir) if cache_dir is not None else root / ".hisam-cache",
            text_device=text_device,
            progress=progress,
        )
        features.update(built)
        present.update(built_present)

    if "title" in items_df.columns:
        titles = ["" if pd.isna(t) else str(t) for t in items_df["title"]]
    else:
        titles = [""] * len(item_ids)
    items = ItemTable(
        ids=np.arange(len(item_ids), dtype=np.int64),
        external_ids=[str(i) for i in item_ids],
        features=features,
        present=present,
        titles=titles,
        meta=items_df.drop(columns=["item_id"]).reset_index(drop=True),
    )
    users = users_df.rename(columns={"user_id": "external_id"}).reset_index(drop=True)
    users["external_id"] = users["external_id"].astype(str)
    dropped = {k: v for k, v in dropped.items() if v} if spec is not None else {}
    return assemble(root.resolve().name, items, users, interactions, dropped=dropped)
