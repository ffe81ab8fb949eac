"""``hisam bench tokenizer``: tokenizer quality on the real catalogue and frozen-encode speed.

Trains every variant of recipes.tokenizer.variants.VARIANTS with the same budget (or reuses artifacts
with --reuse), evaluates them, times DST's frozen encoder on one thread, prints a table and,
as the last line, one JSON object (the form every ``hisam bench`` follows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from data import default_data_dir
from recipes.tokenizer.train import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--tokenizers-dir", default="artifacts/bench/tokenizers")
    parser.add_argument("--report", default="reports/bench-tokenizer")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="reuse trained artifacts found under --tokenizers-dir")


def main(args: argparse.Namespace) -> int:
    import torch

    from data import load_dataset
    from recipes.tokenizer.report import markdown_table, write_report
    from recipes.tokenizer.variants import compare_variants

    ds = load_dataset(args.dataset, args.data_dir, progress=False)
    reports, latency = compare_variants(ds, Path(args.tokenizers_dir), args.epochs, seed=args.seed, reuse=args.reuse)
    modalities = list(ds.items.features)
    write_report(list(reports.values()), modalities, Path(args.report), ds.name)

    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, 1 thread"
    print(markdown_table(list(reports.values()), modalities))
    print()
    print(
        f"DST frozen encode on {machine}: single item p50 {latency['single_p50_ms']:.3f} ms, "
        f"p99 {latency['single_p99_ms']:.3f} ms (target p99 < 2 ms); batch {latency['batch_items_per_s']:.0f} items/s"
    )
    rq = reports["rqvae"].collision_rate
    print(f"DST collision rate / plain RQ-VAE collision rate: {reports['dst'].collision_rate:.4f} / {rq:.4f}")

    def summary(r):
        return {
            "collision_rate": r.collision_rate,
            "collision_rate_resolved": r.collision_rate_resolved,
            "utilisation_per_layer": r.utilisation_per_layer,
            "perplexity_per_layer": r.perplexity_per_layer,
            "recon_fvu": r.recon_fvu,
            "mi_shared_specific": r.mi_shared_specific,
            "train_seconds": r.train_seconds,
        }

    result = {name: summary(r) for name, r in reports.items()}
    result["encode"] = latency
    result["machine"] = machine
    result["dataset"] = ds.name
    print(json.dumps(result))
    return 0
