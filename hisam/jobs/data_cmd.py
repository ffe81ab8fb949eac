"""``hisam data prepare``: fetch a dataset, build its item modalities, report what it holds.

Running it once before training warms every cache (raw files, text and behaviour
embeddings), so later jobs load the dataset in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import time

from data import Dataset, DatasetError, DatasetFetchError, default_data_dir, load_dataset

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-100k", help="'ml-100k' or a dataset directory (see data/FORMAT.md)")
    parser.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help="where datasets and their caches live (default: $HISAM_DATA_DIR, else datasets)",
    )
    parser.add_argument("--text-device", default="cpu", help="device for the sentence encoder on a cache miss")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


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


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        ds = load_dataset(args.dataset, args.data_dir, text_device=args.text_device, progress=not args.no_progress)
    except (DatasetError, DatasetFetchError) as e:
        log.error("%s", e)
        return 1
    log.info("loaded %s in %.2fs", ds.name, time.perf_counter() - t0)
    print(format_summary(ds))  # the table is this command's output; everything else is logged
    return 0
