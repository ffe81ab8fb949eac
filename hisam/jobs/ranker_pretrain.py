"""``hisam ranker pretrain``: PT, next-token prediction over the whole stream (METHOD.md §3 "Losses").

Writes ``<out>/<variant>/seed<k>/pretrain``; ``hisam ranker finetune --init pretrain``
then starts SFT from it (progressive PT -> SFT, the best setting of Hi-SAM Table 2).
"""

from __future__ import annotations

import argparse
import logging

from hisam.data import DatasetError, load_dataset
from hisam.jobs.ranker_common import add_train_arguments, apply_threads, inputs_for, train_stage
from hisam.ranker import run_dir

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser, default_epochs=2, default_lr=1e-3)


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
            directory = run_dir(args.out, variant, seed) / "pretrain"
            result = train_stage(args, ds, variant, seed, "pt", directory, inputs, init=None)
            log.info("%s seed %d: PT done after %d steps -> %s", variant, seed, result.steps, result.checkpoint)
    return 0
