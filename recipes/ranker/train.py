"""Training HMAT: PT, SFT and progressive PT -> SFT (docs/method.md §3 "Losses"; Hi-SAM §3.4.1, Table 2).

Reading order: the training config, the learning-rate schedule, batches, the optimiser,
then ``train`` (one stage) and ``train_progressive`` (PT then SFT).

- PT: next-token prediction over the whole stream with a plain causal mask (``pt_loss``).
- SFT: NLL of each action at its anchor under the model's mask (``sft_loss``).
- Progressive: PT, then SFT starting from the PT weights with a fresh optimiser and
  schedule (the two objectives have different loss scales, so carrying AdamW moments
  across would mis-scale the first SFT steps). Table 2 "w/ PT+SFT" is the best setting.

Optimisation follows nanoGPT: AdamW with decoupled weight decay on matrices and
embeddings only (not norms or biases), linear warm-up then cosine decay to
``min_lr_ratio * lr``, global-norm gradient clipping. On CUDA the forward runs under
autocast (bf16 where supported, else fp16 with a gradient scaler); on CPU it runs in
fp32, since CPU autocast is slow and buys nothing at these sizes.

Determinism and resumption: the batch order of epoch e is a permutation drawn from a
generator seeded with (seed, e), so a run resumed at step s rebuilds exactly the batches
it would have seen; the checkpoint carries model, optimiser, scheduler, scaler, step,
history and the torch RNG state (dropout), so on CPU a resumed run continues bit for bit.

Checkpoints are written in the format of ``models/hmat/checkpoint.py``; the optimiser,
scheduler, scaler and RNG state go to its ``trainer_state.pt``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from models.device import Precision, autocast, pick_device, resolve_precision
from models.hmat.checkpoint import STATE_FILE, load_history, load_weights, save_checkpoint
from models.hmat.losses import pt_loss, sft_loss
from models.hmat.model import HMAT
from models.hmat.sequence import StreamLayout, TokenStream, UserSequence, build_stream

log = logging.getLogger(__name__)

Stage = Literal["pt", "sft"]


@dataclass
class TrainConfig:
    """One training stage. ``epochs`` fixes the schedule length; see ``train`` for early stops."""

    stage: Stage = "sft"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # capped at a tenth of the run, so short runs still decay
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global L2 norm; 0 disables
    seed: int = 0
    precision: Precision = "auto"
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in ("pt", "sft"):
            raise ValueError(f"stage={self.stage!r} is not 'pt' or 'sft'")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision={self.precision!r} is not one of auto, fp32, bf16, fp16")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be positive")


@dataclass
class TrainResult:
    """What a stage returns: the trained model, its per-step history, where it was saved."""

    model: HMAT
    history: list[dict[str, Any]]
    steps: int
    checkpoint: Path | None = None


# --- Schedule -------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): linear warm-up, cosine decay.

    Warm-up reaches 1 at step ``warmup - 1``, so the first step already moves (1 / warmup).
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def effective_warmup(config: TrainConfig, total_steps: int) -> int:
    return max(1, min(config.warmup_steps, total_steps // 10))


# --- Batches --------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The example order of one epoch: a pure function of (seed, epoch), so resumption can rebuild it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class PretokenizedExamples:
    """Every example's token stream built once; a batch is a right-padded stack of them.

    ``build_stream`` walks every token in Python; doing it once per example instead of once
    per example per epoch takes the data path out of the step time (on a GPU the model
    step is faster than re-tokenising a batch of 300-item histories). Padding values are
    read from ``build_stream``'s own padding, so the two paths cannot drift apart:
    ``batch(idx)`` equals ``build_stream([examples[i] for i in idx])`` exactly.
    """

    def __init__(self, examples: Sequence[UserSequence], layout: StreamLayout) -> None:
        self.streams = [build_stream([u], layout) for u in examples]  # each (1, S_i)
        padded = build_stream([UserSequence(), UserSequence(profile=[0])], layout)  # row 0 is one padding slot
        self.pad = {f.name: int(getattr(padded, f.name)[0, 0]) for f in dataclasses.fields(TokenStream)}

    def __len__(self) -> int:
        return len(self.streams)

    def batch(self, index: Sequence[int]) -> TokenStream:
        picked = [self.streams[i] for i in index]
        return TokenStream(
            **{
                name: pad_sequence([getattr(s, name)[0] for s in picked], batch_first=True, padding_value=value)
                for name, value in self.pad.items()
            }
        )  # (B, S_max) per field


def iter_batches(
    data: PretokenizedExamples, config: TrainConfig, start_step: int, stop_step: int
) -> Iterator[tuple[int, int, TokenStream]]:
    """(step, epoch, batch) for steps [start_step, stop_step) of the schedule."""
    per_epoch = math.ceil(len(data) / config.batch_size)
    order, order_epoch = None, -1
    for step in range(start_step, stop_step):
        epoch, k = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(data), config.seed, epoch), epoch
        yield step, epoch, data.batch(order[k * config.batch_size : (k + 1) * config.batch_size].tolist())


# --- Optimiser ------------------------------------------------------------------------------


def build_optimizer(model: HMAT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; decay on 2-D weights (matrices, embeddings), none on norms and biases (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type == "cuda")


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = effective_warmup(config, total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, config.min_lr_ratio)
    )


# --- The loop -------------------------------------------------------------------------------

LOSSES = {"pt": pt_loss, "sft": sft_loss}


@dataclass
class _State:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _trainer_state(state: _State, config: TrainConfig, optimizer, scheduler, scaler) -> dict[str, Any]:
    return {
        "step": state.step,
        "stage": config.stage,
        "train_config": dataclasses.asdict(config),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _resume(directory: Path, model: HMAT, config: TrainConfig, optimizer, scheduler, scaler) -> _State:
    """Restore everything a bit-exact continuation needs; refuses a checkpoint of another stage or schedule."""
    try:  # tensors and plain containers only: a planted pickle must not run code here
        saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refusing {directory / STATE_FILE}: it holds objects other than tensors and plain containers "
            f"(loading it would run code): {str(e).splitlines()[-1] if str(e) else ''}"
        ) from None
    if saved["stage"] != config.stage:
        raise ValueError(f"{directory} holds a {saved['stage']} run; cannot resume it as {config.stage}")
    for key in ("epochs", "batch_size", "seed", "lr"):
        if saved["train_config"][key] != getattr(config, key):
            raise ValueError(
                f"{directory}: resuming with {key}={getattr(config, key)} but the run used {saved['train_config'][key]}"
            )
    load_weights(model, directory)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return _State(step=saved["step"], history=load_history(directory))


def train(
    model: HMAT,
    examples: Sequence[UserSequence],
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    tokenizer_version: str | None = None,
    meta: dict[str, Any] | None = None,
    device: str | torch.device = "auto",
    stop_at_step: int | None = None,
) -> TrainResult:
    """Run one stage (``config.stage``) over history-only ``examples``; returns model and history.

    ``checkpoint_dir``: where checkpoints go (every ``checkpoint_every`` steps and at the
    end). ``resume``: continue the run saved there, if any (a fresh start otherwise).
    ``stop_at_step``: stop (and checkpoint) after this many optimiser steps although the
    schedule is longer: an interruption, as a later ``resume`` sees it.
    History rows: step (1-based), epoch, stage, loss, lr, grad_norm, seconds (cumulative
    over resumptions). A non-finite loss raises ``FloatingPointError`` naming the step.
    """
    if not examples:
        raise ValueError("no training examples")
    # Setup.
    dev = pick_device(device) if isinstance(device, str) else device
    amp_dtype = resolve_precision(config.precision, dev)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    # Model.
    model.to(dev).train()
    loss_fn = LOSSES[config.stage]
    # Optimiser.
    total = math.ceil(len(examples) / config.batch_size) * config.epochs
    optimizer = build_optimizer(model, config, dev)
    scheduler = build_scheduler(optimizer, config, total)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    state = _State()
    if resume and ckpt is not None and (ckpt / STATE_FILE).exists():
        state = _resume(ckpt, model, config, optimizer, scheduler, scaler)
        log.info("resumed %s at step %d/%d from %s", config.stage, state.step, total, ckpt)
    else:
        torch.manual_seed(config.seed)  # dropout stream; weights were initialised by the caller
    end = total if stop_at_step is None else min(total, stop_at_step)
    log.info(
        "%s: %d examples, %d steps (%d per epoch), device %s, %s",
        config.stage,
        len(examples),
        total,
        total // config.epochs,
        dev,
        amp_dtype or "fp32",
    )

    def checkpoint() -> Path | None:
        if ckpt is None:
            return None
        run_meta = {"stage": config.stage, "step": state.step, "total_steps": total, **(meta or {})}
        return save_checkpoint(
            ckpt,
            model,
            tokenizer_version=tokenizer_version,
            meta=run_meta,
            trainer_state=_trainer_state(state, config, optimizer, scheduler, scaler),
            history=state.history,
        )

    # Data and loop.
    data = PretokenizedExamples(examples, model.config.layout)
    bar = tqdm(total=end, initial=min(state.step, end), desc=config.stage, disable=not config.progress, unit="step")
    t0 = time.perf_counter() - (state.history[-1]["seconds"] if state.history else 0.0)  # resumed runs add up
    for step, epoch, batch in iter_batches(data, config, state.step, end):
        batch = batch.to(dev)
        with autocast(dev, amp_dtype):
            loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            # Fail loudly: a NaN step would poison AdamW's moments and every later checkpoint.
            raise FloatingPointError(f"{config.stage} loss is {float(loss)} at step {step + 1} (epoch {epoch})")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        lr = optimizer.param_groups[0]["lr"]
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        state.step = step + 1
        row = {
            "step": state.step,
            "epoch": epoch,
            "stage": config.stage,
            "loss": float(loss.detach()),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "seconds": time.perf_counter() - t0,
        }
        state.history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
        if config.checkpoint_every and state.step % config.checkpoint_every == 0 and state.step < end:
            checkpoint()
    bar.close()
    if state.history:
        last = state.history[-min(len(state.history), 20) :]
        log.info(
            "%s: step %d/%d, loss %.4f (mean of last %d)",
            config.stage,
            state.step,
            total,
            sum(r["loss"] for r in last) / len(last),
            len(last),
        )
    path = checkpoint()
    model.eval()
    return TrainResult(model=model, history=state.history, steps=state.step, checkpoint=path)


def train_progressive(
    model: HMAT,
    examples: Sequence[UserSequence],
    pt: TrainConfig,
    sft: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    tokenizer_version: str | None = None,
    meta: dict[str, Any] | None = None,
    device: str | torch.device = "auto",
) -> tuple[TrainResult, TrainResult]:
    """PT then SFT on the same model (module docstring); checkpoints in ``out_dir/pretrain`` and ``/finetune``."""
    if pt.stage != "pt" or sft.stage != "sft":
        raise ValueError(f"train_progressive takes a pt then an sft config, got {pt.stage} and {sft.stage}")
    dirs = (None, None) if out_dir is None else (Path(out_dir) / "pretrain", Path(out_dir) / "finetune")
    common = {"tokenizer_version": tokenizer_version, "meta": meta, "device": device}
    first = train(model, examples, pt, checkpoint_dir=dirs[0], **common)
    second = train(first.model, examples, sft, checkpoint_dir=dirs[1], **common)
    return first, second
