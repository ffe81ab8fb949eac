"""``hisam ranker pretrain``: PT, next-token prediction over the whole stream (docs/method.md §3 "Losses").

Writes ``<out>/<variant>/seed<k>/pretrain``; ``hisam ranker finetune --init pretrain``
then starts SFT from it (progressive PT -> SFT, the best setting of Hi-SAM Table 2).
"""

from __future__ import annotations

import argparse

from recipes.ranker.runs import add_train_arguments, train_runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser, default_epochs=2, default_lr=1e-3)


def main(args: argparse.Namespace) -> int:
    return train_runs(args, "pt", "pretrain")
