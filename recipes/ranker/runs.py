"""Options and small steps shared by ``hisam ranker pretrain|finetune|eval``.

Run layout under ``--out``: ``<variant>/seed<k>/pretrain`` and ``<variant>/seed<k>/finetune``,
each an HMAT checkpoint (recipes/ranker/train.py); ``report/`` holds what ``ranker eval`` writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from data import Dataset, DatasetError, default_data_dir, load_dataset
from features.profiles import ProfileVocab
from models.hmat.baselines import VARIANTS, uses_item_ids
from models.hmat.checkpoint import load_weights, read_checkpoint_config
from models.hmat.model import HMAT
from recipes.coldstart import SplitRecord, check_split, split_for, tokenizer_split
from recipes.ranker import RankerInputs, load_inputs, model_config, run_dir, select_users, training_sequences
from recipes.ranker.train import TrainConfig, TrainResult, train

DEFAULT_OUT = "runs/ranker"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="ml-100k", help="'ml-100k' or a dataset directory (data/FORMAT.md)")
    parser.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help="where datasets and their caches live (default: $HISAM_DATA_DIR, else datasets)",
    )
    parser.add_argument("--tokenizer", type=Path, help="frozen tokenizer directory (needed by every variant but 'id')")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"run directory (default {DEFAULT_OUT})")
    parser.add_argument("--max-users", type=int, help="use only the first N users (smoke runs)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--item-cold-share",
        type=float,
        help="item cold start (docs/method.md §5): hold out this share of the items with train and test rows "
        "(every training interaction removed, behaviour rebuilt without them); train, tokenizer and eval "
        "must all name the same split",
    )
    parser.add_argument("--item-cold-seed", type=int, default=0, help="seed of the item-cold draw")


def add_train_arguments(parser: argparse.ArgumentParser, default_epochs: int, default_lr: float) -> None:
    add_data_arguments(parser)
    parser.add_argument("--variant", nargs="+", default=["hmat"], choices=VARIANTS, help="model variants to train")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run per seed")
    parser.add_argument(
        "--preset", default="cpu", choices=("cpu", "small", "large"), help="trunk size (docs/method.md §3)"
    )
    parser.add_argument(
        "--max-items", type=int, default=300, help="history items per sequence T (docs/method.md §3: 300)"
    )
    parser.add_argument("--epochs", type=int, default=default_epochs)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=default_lr)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="auto: bf16/fp16 autocast on CUDA, fp32 on CPU",
    )
    parser.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: end only)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    parser.add_argument(
        "--train-until",
        type=float,
        default=None,
        help="train on the first FRACTION of all interactions in time order only (at most the train split): "
        "a model frozen at an earlier point, whose later events 'hisam bench trainer' replays",
    )


def apply_threads(args: argparse.Namespace) -> None:
    """On a shared or small CPU, fewer torch threads can be much faster: small ops pay for every hand-off."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)


def train_config(args: argparse.Namespace, stage: str, seed: int) -> TrainConfig:
    return TrainConfig(
        stage=stage,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=seed,
        precision=args.precision,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )


def time_prefix(ds: Dataset, fraction: float | None) -> Dataset:
    """``ds`` with its train part cut to the first ``fraction`` of all interactions (time order); None: unchanged.

    Only the train part shrinks (training sequences read ``ds.train``); the test part and
    everything else stay, so evaluation is unchanged. The checkpoint records the cut as
    ``train_rows`` (``run_meta``).
    """
    if fraction is None:
        return ds
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--train-until must be in (0, 1], got {fraction}")
    cut = min(int(fraction * len(ds.interactions)), len(ds.train))
    return dataclasses.replace(ds, train=ds.interactions.iloc[:cut])


def inputs_for(
    ds: Dataset,
    variant: str,
    args: argparse.Namespace,
    cache: dict[bool, RankerInputs],
    split: SplitRecord | None = None,
) -> RankerInputs:
    """Item codes and profiles for a variant; SID variants share one tokenizer pass.

    A SID variant's tokenizer must have been fitted on the same item-cold split (or on none
    when ``split`` is None): ``recipes.coldstart.SplitMismatch`` otherwise.
    """
    key = uses_item_ids(variant)
    if not key and args.tokenizer is not None and (args.tokenizer / "config.json").exists():
        check_split(f"tokenizer {args.tokenizer}", tokenizer_split(args.tokenizer), split)
    if key not in cache:
        cache[key] = load_inputs(ds, variant, args.tokenizer)
    return cache[key]


def run_meta(
    args: argparse.Namespace, variant: str, seed: int, inputs: RankerInputs, split: SplitRecord | None = None
) -> dict[str, Any]:
    """What a checkpoint records besides the model config: enough for eval to rebuild its inputs."""
    return {
        "item_cold_split": None if split is None else split.to_dict(),
        "variant": variant,
        "seed": seed,
        "preset": args.preset,
        "dataset": inputs.dataset.name,
        "max_users": args.max_users,
        "train_rows": len(inputs.dataset.train),
        "profile_vocab": inputs.vocab.to_dict(),
    }


def train_stage(
    args: argparse.Namespace,
    ds: Dataset,
    variant: str,
    seed: int,
    stage: str,
    directory: Path,
    inputs: RankerInputs,
    init: Path | None,
    split: SplitRecord | None = None,
) -> TrainResult:
    """Setup -> model -> optimiser -> data -> loop for one (variant, seed, stage)."""
    # Model: seeded so that every seed is one reproducible initialisation.
    torch.manual_seed(seed)
    model = HMAT(model_config(args.preset, variant, inputs, args.max_items))
    if init is not None:
        saved = read_checkpoint_config(init)
        check_split(f"checkpoint {init}", saved.get("item_cold_split"), split)
        if saved["tokenizer_version"] != inputs.tokenizer_version:
            raise ValueError(
                f"{init} was trained on codes of {saved['tokenizer_version']}, not {inputs.tokenizer_version}"
            )
        load_weights(model, init)
    # Optimiser (built inside train from this config).
    config = train_config(args, stage, seed)
    # Data.
    examples = training_sequences(
        ds, inputs.item_codes, inputs.profiles, args.max_items, users=select_users(ds, args.max_users)
    )
    # Loop.
    return train(
        model,
        examples,
        config,
        checkpoint_dir=directory,
        resume=args.resume,
        tokenizer_version=inputs.tokenizer_version,
        meta={**run_meta(args, variant, seed, inputs, split), "init": str(init) if init else None},
        device=args.device,
    )


def saved_vocab(config: dict[str, Any]) -> ProfileVocab:
    return ProfileVocab.from_dict(config["profile_vocab"])


log = logging.getLogger(__name__)


def dataset_or_none(args: argparse.Namespace) -> Dataset | None:
    """The dataset the job names, or None after logging why it cannot be loaded."""
    try:
        return load_dataset(args.dataset, args.data_dir, progress=not args.no_progress)
    except DatasetError as e:
        log.error("%s", e)
        return None


def train_runs(
    args: argparse.Namespace,
    stage: str,
    subdir: str,
    init_for: Callable[[Path], Path | None] = lambda run: None,
) -> int:
    """Train ``stage`` ("pt" or "sft") for every variant and seed; checkpoints in <run>/<subdir>."""
    apply_threads(args)
    ds = dataset_or_none(args)
    if ds is None:
        return 1
    try:  # the split first: it needs the whole dataset, then the time cut applies to its train part
        ds, split = split_for(ds, getattr(args, "item_cold_share", None), getattr(args, "item_cold_seed", 0))
    except ValueError as e:
        log.error("%s", e)
        return 1
    ds = time_prefix(ds, getattr(args, "train_until", None))
    cache: dict = {}
    for variant in args.variant:
        try:
            inputs = inputs_for(ds, variant, args, cache, split)
        except (FileNotFoundError, ValueError) as e:  # no or bad tokenizer for a semantic-ID variant
            log.error("%s: %s", variant, e)
            return 1
        for seed in args.seeds:
            run = run_dir(args.out, variant, seed)
            try:
                init = init_for(run)
            except FileNotFoundError as e:
                log.error("%s", e)
                return 1
            result = train_stage(args, ds, variant, seed, stage, run / subdir, inputs, init=init, split=split)
            log.info(
                "%s seed %d: %s done after %d steps -> %s",
                variant,
                seed,
                stage.upper(),
                result.steps,
                result.checkpoint,
            )
    return 0
