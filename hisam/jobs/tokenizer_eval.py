"""``hisam tokenizer eval``: evaluate trained tokenizers and write the report (table + plots)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hisam.jobs.tokenizer_train import add_common

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--variant", action="append", help="repeatable; default: every artifact under --tokenizers-dir")
    parser.add_argument("--out", default="reports/tokenizer", help="report directory")


def main(args: argparse.Namespace) -> int:
    from data import load_dataset
    from recipes.tokenizer.report import markdown_table, write_report
    from recipes.tokenizer.variants import evaluate_tokenizer

    root = Path(args.tokenizers_dir)
    names = (
        args.variant or sorted(p.name for p in root.iterdir() if (p / "config.json").exists()) if root.exists() else []
    )
    if not names:
        log.error("no tokenizer artifacts under %s: run `hisam tokenizer train` first", root)
        return 2
    ds = load_dataset(args.dataset, args.data_dir, progress=False)
    reports = []
    for name in names:
        log.info("evaluating %s", name)
        reports.append(evaluate_tokenizer(root / name, ds))
    modalities = list(ds.items.features)
    path = write_report(reports, modalities, Path(args.out), ds.name)
    print(markdown_table(reports, modalities))
    print(f"\nreport: {path}")
    return 0
