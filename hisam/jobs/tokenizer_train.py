"""``hisam tokenizer train``: train semantic-ID tokenizers on a dataset's item catalogue."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from data import default_data_dir
from recipes.tokenizer.train import TrainConfig

log = logging.getLogger(__name__)


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", default="ml-100k", help="'ml-100k' or a directory in the custom format (data/FORMAT.md)"
    )
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--tokenizers-dir", default="artifacts/tokenizers", help="where tokenizer artifacts live")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from recipes.tokenizer.variants import VARIANTS

    add_common(parser)
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="repeatable; default: dst")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument(
        "--lr", type=float, default=None, help="default: per kind (recipes.tokenizer.variants.DEFAULT_LR)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="model config override, e.g. --set codebook_size=128",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--item-cold-share",
        type=float,
        help="fit on an item-cold split (recipes/coldstart, docs/method.md §5): hold out this share of items, "
        "rebuild behaviour without them, fit on the items with a training interaction only",
    )
    parser.add_argument("--item-cold-seed", type=int, default=0, help="seed of the item-cold draw")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(args: argparse.Namespace) -> int:
    import torch

    from data import load_dataset
    from recipes.coldstart import split_for, train_split_tokenizer
    from recipes.tokenizer.variants import DEFAULT_LR, VARIANTS, train_variant

    ds = load_dataset(args.dataset, args.data_dir, progress=not args.no_progress)
    try:
        ds, split = split_for(ds, args.item_cold_share, args.item_cold_seed)
    except ValueError as e:
        log.error("%s", e)
        return 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    overrides = parse_overrides(args.set)
    for name in args.variant or ["dst"]:
        kind = VARIANTS[name][0]
        cfg = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr if args.lr is not None else DEFAULT_LR[kind],
            seed=args.seed,
            device=device,
            progress=not args.no_progress,
        )
        if split is None:
            tok = train_variant(name, ds, Path(args.tokenizers_dir), cfg, overrides)
        else:
            tok = train_split_tokenizer(name, ds, split, Path(args.tokenizers_dir), cfg, overrides)
        print(f"{name}: {tok.version} -> {Path(args.tokenizers_dir) / name}")
    return 0
