"""``hisam run``: the main job on the embedded defaults, the whole loop start to finish on one machine.

Dataset -> frozen DST tokenizer -> initial HMAT ranker -> broker, stream worker, Triton,
Rank server and near-line trainer -> backfill, live replay with progress, sample Rank
calls -> ``reports/run/report.md``. See hisam/run/loop.py for the stages. Ctrl-C stops every
process cleanly and still writes the report of what ran.

``--tokenizer-report`` also trains the tokenizer baselines (MACRec, RQ-VAE, the DST
ablations) and writes their comparison to ``reports/tokenizer`` (about 7 more minutes).
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from data import default_data_dir
from recipes.tokenizer.train import TrainConfig

if TYPE_CHECKING:
    from hisam.run.state import LoopOptions

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hisam.run.state import LoopOptions

    d = LoopOptions()
    parser.add_argument("--dataset", default=d.dataset)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--artifacts", type=Path, default=d.artifacts, help="tokenizer and ranker are kept here")
    parser.add_argument("--reports", type=Path, default=d.reports, help="reports are written here")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="this run's stores and logs (default runs/loop/<time>)"
    )
    parser.add_argument("--backend", choices=["sqlite", "redis"], default=d.backend, help="online store")
    parser.add_argument("--rate", type=float, default=d.rate, help="replayed actions per second")
    parser.add_argument("--replay-limit", type=int, default=d.replay_limit, help="replay at most N actions (0: all)")
    parser.add_argument("--max-items", type=int, default=d.max_items, help="ranker history length T")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads (ranker training, trainer)")
    parser.add_argument("--min-samples", type=int, default=d.min_samples, help="trainer: samples between gates")
    parser.add_argument(
        "--drain-timeout", type=float, default=d.drain_timeout_s, help="seconds to let workers catch up"
    )
    parser.add_argument(
        "--progress-every", type=float, default=d.progress_every_s, help="seconds between progress lines"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--tokenizer-report", action="store_true", help="also compare the tokenizer baselines")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="tokenizer epochs (--tokenizer-report)")


def tokenizer_report(args: argparse.Namespace) -> None:
    """The tokenizer comparison (DST vs baselines) with its report: reports/tokenizer/report.md."""
    import torch

    from data import load_dataset
    from recipes.tokenizer.report import markdown_table, write_report
    from recipes.tokenizer.variants import VARIANTS, compare_variants

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ds = load_dataset(args.dataset, str(args.data_dir))
    log.info("tokenizers: %s on %s", ", ".join(VARIANTS), device)
    by_name, latency = compare_variants(ds, Path(args.artifacts) / "tokenizers", args.epochs, device=device)
    extra = (
        f"DST frozen encode, one thread: single item p50 {latency['single_p50_ms']:.3f} ms, "
        f"p99 {latency['single_p99_ms']:.3f} ms; batch {latency['batch_items_per_s']:.0f} items/s."
    )
    reports = list(by_name.values())
    path = write_report(reports, list(ds.items.features), Path(args.reports) / "tokenizer", ds.name, extra)
    print(markdown_table(reports, list(ds.items.features)))
    print(f"tokenizer report: {path}")


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def options(args: argparse.Namespace) -> LoopOptions:
    """The loop's options from the command line (the rest keep LoopOptions' defaults)."""
    from hisam.run.state import LoopOptions

    return LoopOptions(
        dataset=args.dataset,
        data_dir=args.data_dir,
        artifacts=args.artifacts,
        reports=args.reports,
        work_dir=args.work_dir,
        backend=args.backend,
        max_items=args.max_items,
        threads=args.threads,
        rate=args.rate,
        replay_limit=args.replay_limit,
        min_samples=args.min_samples,
        drain_timeout_s=args.drain_timeout,
        progress_every_s=args.progress_every,
        progress=not args.no_progress,
    )


def main(args: argparse.Namespace) -> int:
    from hisam.run.loop import run_loop
    from hisam.run.report import one_line, summary_of, write_report

    started = time.perf_counter()
    # Ctrl-C and SIGTERM (a supervisor's or a container's stop) both stop the loop the same
    # way: every child stopped, the report written, exit status 130. Installed explicitly:
    # a process started with SIGINT ignored (a background job of a shell) would otherwise
    # never see its Ctrl-C.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.tokenizer_report:
        tokenizer_report(args)
    run = None
    try:
        run = run_loop(options(args))
    finally:
        if run is not None:
            path = write_report(run, Path(args.reports) / "run")
            print(path.read_text())
            print(f"report: {path}  ({time.perf_counter() - started:.0f} s in all): {one_line(summary_of(run))}")
    if run is not None and run.interrupted:
        return 130
    if run is None or run.error:
        return 1
    failed = summary_of(run)["rank"]["errors"]
    if failed:
        log.error("%d Rank calls failed during the run (see the report)", failed)
    return 1 if failed else 0
