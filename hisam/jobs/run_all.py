"""``hisam run``: the main job on the embedded defaults, start to finish on one machine.

Today it covers what the project has built so far: fetch ML-100K and build its item
modalities, train the tokenizers (DST and the baselines it is compared with), evaluate them
and write the report. Later stages (streaming ingestion, ranker, serving, near-line
training) join this same job as they land.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from models.tokenizer import TrainConfig

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", default=os.environ.get("HISAM_DATA_DIR", "data"))
    parser.add_argument("--artifacts", default="artifacts", help="tokenizers and models are written here")
    parser.add_argument("--reports", default="reports", help="reports are written here")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="tokenizer training epochs")


def main(args: argparse.Namespace) -> int:
    import torch

    from hisam.data import load_dataset
    from hisam.tokenizer_report import markdown_table, write_report
    from hisam.tokenizers import VARIANTS, compare_variants

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("[1/3] dataset %s", args.dataset)
    ds = load_dataset(args.dataset, args.data_dir)
    log.info("%s", ds.summary())

    log.info("[2/3] tokenizers: %s on %s", ", ".join(VARIANTS), device)
    by_name, latency = compare_variants(ds, Path(args.artifacts) / "tokenizers", args.epochs, device=device)
    reports = list(by_name.values())
    log.info("[3/3] report")
    modalities = list(ds.items.features)
    extra = (
        f"DST frozen encode, one thread: single item p50 {latency['single_p50_ms']:.3f} ms, "
        f"p99 {latency['single_p99_ms']:.3f} ms; batch {latency['batch_items_per_s']:.0f} items/s."
    )
    path = write_report(reports, modalities, Path(args.reports) / "tokenizer", ds.name, extra)
    print(markdown_table(reports, modalities))
    print(extra)
    print(f"report: {path}  ({time.perf_counter() - started:.0f} s in all)")
    return 0
