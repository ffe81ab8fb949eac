"""``hisam ranker eval``: score the test split with every fine-tuned run and write the report.

The evaluation is recipes/ranker/eval_runs.py; this writes ``report.md`` (mean ± std over
seeds, Hi-SAM Table 2 layout, and paired differences to ``--reference`` with bootstrap
intervals), ``metrics.json`` and training-curve plots to ``--report-dir``. With
``--item-cold-share`` the runs must have been trained on that item-cold split
(recipes/coldstart), which the evaluation rebuilds.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from models.hmat.baselines import VARIANTS
from recipes.coldstart import split_for
from recipes.ranker import PROTOCOLS, write_report
from recipes.ranker.eval_runs import EvalConfig, EvalRunsError, collect_runs, evaluate_runs
from recipes.ranker.runs import add_data_arguments, apply_threads, dataset_or_none

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, help="variants to evaluate (default: all found)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds to evaluate (default: all found)")
    parser.add_argument(
        "--protocol",
        default="stream",
        choices=PROTOCOLS,
        help="stream: history includes earlier test interactions; train: train history only",
    )
    parser.add_argument(
        "--scorer",
        default="grouped",
        choices=("grouped", "one-pass"),
        help="stream protocol only. grouped: one stream per user scores every test event against the history "
        "and the events before it (docs/method.md); one-pass: one stream per scored row, the definition "
        "(the same scores, many more tokens)",
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="OUT=TOKENIZER",
        help="more fine-tuned runs for the same report, trained on another tokenizer's codes (e.g. HMAT on "
        "RQ-VAE IDs: runs/ranker-rqvae=artifacts/tokenizers/rqvae); their rows are labelled '<variant>@<kind>'; "
        "repeatable",
    )
    parser.add_argument("--report-dir", type=Path, help="where the report goes (default <out>/report)")
    parser.add_argument("--max-tokens", type=int, default=32768, help="padded tokens per scoring batch")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--cold-k", type=int, default=10, help="k of the cold-item recall@k and NDCG@k")
    parser.add_argument(
        "--reference",
        default="id",
        help="row label the other rows are compared with, by a paired bootstrap over users (default: id)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")


def main(args: argparse.Namespace) -> int:
    apply_threads(args)
    ds = dataset_or_none(args)
    if ds is None:
        return 1
    config = EvalConfig(
        protocol=args.protocol,
        scorer=args.scorer,
        max_tokens=args.max_tokens,
        precision=args.precision,
        device=args.device,
        max_users=args.max_users,
        progress=not args.no_progress,
        cold_k=args.cold_k,
        reference=args.reference,
        bootstrap=args.bootstrap,
    )
    try:
        ds, split = split_for(ds, args.item_cold_share, args.item_cold_seed)
    except ValueError as e:
        log.error("%s", e)
        return 1
    try:
        runs = collect_runs(args.out, args.tokenizer, args.also, args.variant, args.seeds)
        evaluation = evaluate_runs(ds, runs, config, split)
    except EvalRunsError as e:
        log.error("%s", e)
        return 1
    report_dir = args.report_dir or args.out / "report"
    path = write_report(report_dir, evaluation.results, evaluation.histories, evaluation.context, evaluation.paired)
    log.info("report written to %s", path)
    return 0
