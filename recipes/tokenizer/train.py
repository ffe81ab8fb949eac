"""Training loop shared by the three tokenizers: setup -> k-means init -> epochs of batches.

DST's vCLUB nets get their own optimiser and are stepped first in every step (docs/method.md §1b:
"step q to maximise log q(u_i|z_i) on positive pairs; step the tokenizer to minimise
I_vCLUB"); the tokenizer's optimiser never touches them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 150
    batch_size: int = 256
    lr: float = 1e-3
    codebook_lr_scale: float = 10.0
    aux_lr: float = 1e-3
    warmup_steps: int = 50
    restart_every: int = 10  # steps between dead-code checks
    restart_threshold: float = 0.05  # a code is dead when its usage EMA < threshold / K
    restart_until: float = 0.85  # share of training after which codes are left to settle
    grad_clip: float = 1.0
    # Codebook hygiene at the end (all tokenizers alike): refit every codebook by k-means on
    # the inputs it sees from the trained encoder, layer by layer, then train only the
    # decoders for a few epochs on the now fixed codes. On 1,682 items the jointly trained
    # deeper RQ layers otherwise end with 20-50% of their codes in use: the residuals keep
    # moving under codes that were placed for earlier residuals.
    refit: bool = True
    refit_epochs: int = 20
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def to_tensors(
    features: dict[str, np.ndarray], present: dict[str, np.ndarray], device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    x = {m: torch.as_tensor(np.asarray(v, dtype=np.float32), device=device) for m, v in features.items()}
    p = {m: torch.as_tensor(np.asarray(v, dtype=bool), device=device) for m, v in present.items()}
    return x, p


def _slice(d: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in d.items()}


def train_tokenizer(
    model: nn.Module, features: dict[str, np.ndarray], present: dict[str, np.ndarray], cfg: TrainConfig
) -> list[dict[str, float]]:
    """Train ``model`` in place on the item catalogue; returns the per-epoch loss history."""
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    # On the training device: the k-means seeding and dead-code restarts draw on the data
    # there (models/tokenizer/quantize.py), and so does the batch order.
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model.to(device)
    x, p = to_tensors(features, present, cfg.device)
    n = next(iter(x.values())).shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 items to train a tokenizer, got {n}")
    batch = min(cfg.batch_size, n)
    model.init_codebooks(x, p, gen)

    has_aux = hasattr(model, "aux_parameters") and getattr(model.config, "lambda_mi", 0) > 0
    main_params = model.main_parameters() if hasattr(model, "main_parameters") else list(model.parameters())
    # Codebooks get a larger step: Adam moves every parameter by about lr per step, and an
    # encoder output moved by many weights at once otherwise outruns the codewords chasing
    # it (seen as a commitment loss that grows for the whole run).
    codebook_ids = {id(p) for name, p in model.named_parameters() if name.endswith("codebook")}
    groups = [
        {"params": [p for p in main_params if id(p) not in codebook_ids], "lr": cfg.lr},
        {"params": [p for p in main_params if id(p) in codebook_ids], "lr": cfg.lr * cfg.codebook_lr_scale},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    aux_opt = torch.optim.Adam(model.aux_parameters(), lr=cfg.aux_lr) if has_aux else None
    steps_per_epoch = math.ceil(n / batch)
    total = cfg.epochs * steps_per_epoch

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history: list[dict[str, float]] = []
    step = 0
    bar = tqdm(total=total, desc=f"train {model.kind}", disable=not cfg.progress, unit="step")
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen, device=gen.device)
        sums: dict[str, float] = {}
        for b in range(steps_per_epoch):
            idx = perm[b * batch : (b + 1) * batch].to(device)
            xb, pb = _slice(x, idx), _slice(p, idx)
            if aux_opt is not None:
                aux_opt.zero_grad(set_to_none=True)
                aux_loss = model.aux_loss(xb, pb)
                aux_loss.backward()
                aux_opt.step()
            out = model(xb, pb)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if aux_opt is not None:  # q is held still during the tokenizer's step
                aux_opt.zero_grad(set_to_none=True)
            torch.nn.utils.clip_grad_norm_(main_params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            if step % cfg.restart_every == 0 and step < cfg.restart_until * total:
                with torch.no_grad():
                    for vq, inp in out.layer_inputs:
                        vq.restart_dead(inp.detach(), cfg.restart_threshold, gen)
            for k, v in {"loss": out.loss.detach(), **out.terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.update(1)
        record = {k: v / steps_per_epoch for k, v in sums.items()}
        record["epoch"] = epoch
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if epoch % max(1, cfg.epochs // 10) == 0 or epoch == cfg.epochs - 1:
            log.debug("epoch %d %s", epoch, {k: round(v, 4) for k, v in record.items()})
    bar.close()
    if cfg.refit and hasattr(model, "refit_codebooks"):
        _refit(model, x, p, cfg, gen, batch, history)
    model.eval()
    return history


def _refit(
    model: nn.Module,
    x: dict[str, torch.Tensor],
    p: dict[str, torch.Tensor],
    cfg: TrainConfig,
    gen: torch.Generator,
    batch: int,
    history: list[dict[str, float]],
) -> None:
    """k-means refit of the codebooks, then decoder-only epochs (see TrainConfig.refit)."""
    model.eval()  # no usage updates; encoder and codebooks stay as refitted
    model.refit_codebooks(x, p, gen)
    params = model.decoder_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr * 0.3)
    n = next(iter(x.values())).shape[0]
    for epoch in range(cfg.refit_epochs):
        perm = torch.randperm(n, generator=gen, device=gen.device)
        total = 0.0
        steps = 0
        for s in range(0, n, batch):
            idx = perm[s : s + batch].to(next(iter(x.values())).device)
            out = model(_slice(x, idx), _slice(p, idx))
            opt.zero_grad(set_to_none=True)
            recon = sum(((xh[r] - t[r]) ** 2).sum(-1).mean() for xh, t, r in out.recon.values() if bool(r.any()))
            recon.backward()
            opt.step()
            total += float(recon.detach())
            steps += 1
        history.append({"epoch": len(history), "refit_recon": total / max(steps, 1)})


@torch.no_grad()
def encode_all(
    model: nn.Module, features: dict[str, np.ndarray], present: dict[str, np.ndarray], batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N, L) and last-layer distances (N, K) of every item, in eval mode."""
    model.eval()
    x, p = to_tensors(features, present, next(model.parameters()).device.type)
    n = next(iter(x.values())).shape[0]
    codes, dists = [], []
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(n, s + batch_size))
        c, d = model.encode(_slice(x, idx), _slice(p, idx))
        codes.append(c.cpu().numpy())
        dists.append(d.cpu().numpy())
    return np.concatenate(codes), np.concatenate(dists)
