"""``hisam data prepare``: fetch a dataset, build its item modalities, report what it holds.

Running it once before training warms every cache (raw files, text and behaviour
embeddings), so later jobs load the dataset in well under a second.

On a dataset directory (data/FORMAT.md) it builds the modalities that no
``item_embeddings/<modality>.npz`` provides, from the raw files (data.prepare): text from
item columns, behaviour from the training interactions, metadata from declared columns.
The options it was given are written to the directory's ``dataset.json``, so every later
command (``hisam tokenizer train``, ``hisam run`` ...) loads the same modalities.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

from data import Dataset, DatasetError, DatasetFetchError, default_data_dir, load_dataset

log = logging.getLogger(__name__)


def _names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-100k", help="'ml-100k' or a dataset directory (see data/FORMAT.md)")
    parser.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help="where datasets and their caches live (default: $HISAM_DATA_DIR, else datasets)",
    )
    parser.add_argument(
        "--text-device", default="auto", help="device for the sentence encoder on a cache miss (auto: CUDA if present)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g = parser.add_argument_group("dataset directories (saved to DIR/dataset.json; default: what it holds)")
    g.add_argument(
        "--build", type=_names, help="modalities to build, comma separated (default text,behaviour,metadata)"
    )
    g.add_argument(
        "--text-columns",
        type=_names,
        help="items.csv columns embedded as text (default: title, then description, tags, categories, "
        "category, genres, genre when present)",
    )
    g.add_argument(
        "--categorical",
        type=_names,
        help="items.csv columns one-hot (or hashed) into metadata (default: categories, category, genres, genre, "
        "tags, brand when present); '' for none",
    )
    g.add_argument("--numeric", type=_names, help="items.csv columns standardised into metadata (default: none)")
    g.add_argument("--multi-value-separator", help="separator of several values in one cell (default '|')")
    g.add_argument(
        "--drop-unknown-items", action="store_true", default=None, help="drop interactions with items not in items.csv"
    )
    g.add_argument(
        "--drop-unknown-users", action="store_true", default=None, help="drop interactions with users not in users.csv"
    )


SPEC_OPTIONS = ("build", "text_columns", "categorical", "numeric", "multi_value_separator",
                "drop_unknown_items", "drop_unknown_users")  # fmt: skip


def format_summary(ds: Dataset) -> str:
    """The summary as a two-column text table."""
    rows = []
    for key, value in ds.summary().items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        rows.append((key, str(value)))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


def _directory_spec(args: argparse.Namespace):
    """The spec for a dataset directory: its dataset.json (or the defaults) with the options applied, saved."""
    from data.prepare import PrepareSpec, item_columns, read_spec, write_spec

    root = next((p for p in (Path(args.dataset), Path(args.data_dir) / args.dataset) if p.is_dir()), None)
    if root is None:
        return None, None
    spec = read_spec(root) or PrepareSpec()
    overrides = {k: getattr(args, k) for k in SPEC_OPTIONS if getattr(args, k, None) is not None}
    spec = replace(spec, **overrides).resolved(item_columns(root))
    path = write_spec(root, spec)
    log.info("dataset spec: %s", path)
    return root, spec


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        spec = None
        if args.dataset != "ml-100k":
            _, spec = _directory_spec(args)
        elif any(getattr(args, k, None) is not None for k in SPEC_OPTIONS):
            raise DatasetError("--build, --text-columns, --categorical, ... apply to dataset directories, not ml-100k")
        ds = load_dataset(
            args.dataset, args.data_dir, text_device=args.text_device, progress=not args.no_progress, spec=spec
        )
    except (DatasetError, DatasetFetchError) as e:
        log.error("%s", e)
        return 1
    log.info("loaded %s in %.2fs", ds.name, time.perf_counter() - t0)
    print(format_summary(ds))  # the table is this command's output; everything else is logged
    if spec is not None and spec.timings:
        print("built: " + ", ".join(f"{m} {s:.1f}s" for m, s in spec.timings.items()))
    return 0
