"""``hisam ranker finetune``: SFT, the action NLL at every anchor (METHOD.md §3 "Losses").

``--init pretrain`` starts from the run's own PT checkpoint (``hisam ranker pretrain``),
which is the progressive PT -> SFT schedule; ``--init PATH`` from any checkpoint with the
same model shape; the default trains from scratch. Writes ``<out>/<variant>/seed<k>/finetune``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hisam.data import DatasetError, load_dataset
from hisam.jobs.ranker_common import add_train_arguments, apply_threads, inputs_for, train_stage
from hisam.ranker import run_dir

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser, default_epochs=5, default_lr=1e-3)
    parser.add_argument(
        "--init",
        default="none",
        help="'none' (from scratch), 'pretrain' (this run's PT checkpoint) or a checkpoint directory",
    )


def init_dir(init: str, run: Path) -> Path | None:
    if init == "none":
        return None
    path = run / "pretrain" if init == "pretrain" else Path(init)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"--init {init}: no checkpoint at {path} (run 'hisam ranker pretrain' first?)")
    return path


def main(args: argparse.Namespace) -> int:
    apply_threads(args)
    try:
        ds = load_dataset(args.dataset, args.data_dir, progress=not args.no_progress)
    except DatasetError as e:
        log.error("%s", e)
        return 1
    cache: dict = {}
    for variant in args.variant:
        try:
            inputs = inputs_for(ds, variant, args, cache)
        except (FileNotFoundError, ValueError) as e:  # no or bad tokenizer for a semantic-ID variant
            log.error("%s: %s", variant, e)
            return 1
        for seed in args.seeds:
            run = run_dir(args.out, variant, seed)
            try:
                init = init_dir(args.init, run)
            except FileNotFoundError as e:
                log.error("%s", e)
                return 1
            result = train_stage(args, ds, variant, seed, "sft", run / "finetune", inputs, init=init)
            log.info("%s seed %d: SFT done after %d steps -> %s", variant, seed, result.steps, result.checkpoint)
    return 0
