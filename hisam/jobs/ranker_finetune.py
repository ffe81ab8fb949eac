"""``hisam ranker finetune``: SFT, the action NLL at every anchor (docs/method.md §3 "Losses").

``--init pretrain`` starts from the run's own PT checkpoint (``hisam ranker pretrain``),
which is the progressive PT -> SFT schedule; ``--init PATH`` from any checkpoint with the
same model shape; the default trains from scratch. Writes ``<out>/<variant>/seed<k>/finetune``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recipes.ranker.runs import add_train_arguments, train_runs


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
    return train_runs(args, "sft", "finetune", lambda run: init_dir(args.init, run))
