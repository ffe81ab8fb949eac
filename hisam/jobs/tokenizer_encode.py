"""``hisam tokenizer encode``: semantic IDs of items with a frozen tokenizer.

Encodes the dataset's catalogue (collision-free, written as CSV), or only the given items.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from pathlib import Path

from hisam.jobs.tokenizer_train import add_common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--variant", default="dst")
    parser.add_argument("--item", action="append", help="external item id (repeatable); default: every item")
    parser.add_argument("--out", default="-", help="CSV file, or - for standard output")


def main(args: argparse.Namespace) -> int:
    from data import load_dataset
    from models.tokenizer import FrozenTokenizer
    from recipes.tokenizer.variants import encode_catalogue

    tok = FrozenTokenizer.load(Path(args.tokenizers_dir) / args.variant)
    ds = load_dataset(args.dataset, args.data_dir, progress=False)
    _, tokens, moved = encode_catalogue(tok, ds)
    ids = ds.items.external_ids
    rows = range(len(ids))
    if args.item:
        unknown = [i for i in args.item if i not in ds.items.row_of]
        if unknown:
            print(f"unknown item ids: {', '.join(unknown)}", file=sys.stderr)
            return 2
        rows = [ds.items.row_of[i] for i in args.item]
    with contextlib.nullcontext(sys.stdout) if args.out == "-" else open(args.out, "w", newline="") as out:
        w = csv.writer(out)
        w.writerow(["item_id", "title", *[f"t{l}" for l in range(tok.n_codes)], "reassigned", "tokenizer_version"])
        for r in rows:
            w.writerow([ids[r], ds.items.titles[r], *tokens[r].tolist(), int(moved[r]), tok.version])
    return 0
