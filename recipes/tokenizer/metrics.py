"""Diagnostics of a tokenizer (docs/method.md §1b, Hi-SAM Fig. 3).

Letters: N items, L code length, K codebook size, M modalities.
"""

from __future__ import annotations

import numpy as np
import torch

from models.tokenizer.losses import VCLUB


def utilisation(codes: np.ndarray, codebook_size: int) -> list[float]:
    """Share of each layer's K entries used by at least one item."""
    return [len(np.unique(codes[:, l])) / codebook_size for l in range(codes.shape[1])]


def perplexity(codes: np.ndarray, codebook_size: int) -> list[float]:
    """exp(entropy) of each layer's code distribution over the items (K at best)."""
    out = []
    for l in range(codes.shape[1]):
        p = np.bincount(codes[:, l], minlength=codebook_size) / len(codes)
        p = p[p > 0]
        out.append(float(np.exp(-(p * np.log(p)).sum())))
    return out


def fraction_of_variance_unexplained(x_hat: np.ndarray, target: np.ndarray) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2: 0 is perfect, 1 is as good as the mean."""
    sst = ((target - target.mean(0)) ** 2).sum()
    return float(((target - x_hat) ** 2).sum() / max(sst, 1e-12))


def code_modality_association(
    codes: np.ndarray, features: dict[str, np.ndarray], present: dict[str, np.ndarray]
) -> np.ndarray:
    """(L, M) chance-corrected correlation ratio between each code layer and each modality.

    For layer l and modality m: group the items (with m present) by their code at layer l and
    measure how much of the variance of m's standardised raw embedding the grouping explains,
    epsilon^2 = (SSB - (G - 1) * SSW / (N - G)) / SST. Plain eta^2 = SSB / SST would credit any
    grouping into many small groups (K = 256 over ~1,700 items explains ~15% by chance alone);
    epsilon^2 is about 0 for a random grouping. This is the layer x modality heatmap of Hi-SAM
    Fig. 3: shared layers should relate to all modalities, specific ones to their own.
    """
    names = list(features)
    out = np.zeros((codes.shape[1], len(names)))
    for j, m in enumerate(names):
        rows = present[m]
        y = features[m][rows].astype(np.float64)
        std = y.std(0)
        y = (y[:, std > 1e-9] - y[:, std > 1e-9].mean(0)) / std[std > 1e-9]
        n = len(y)
        sst = (y**2).sum()
        for l in range(codes.shape[1]):
            g = codes[rows, l]
            uniq, inv = np.unique(g, return_inverse=True)
            big_g = len(uniq)
            if n <= big_g or sst <= 0:
                continue
            sums = np.zeros((big_g, y.shape[1]))
            np.add.at(sums, inv, y)
            counts = np.bincount(inv, minlength=big_g)
            ssb = ((sums**2).sum(1) / counts).sum()
            ssw = sst - ssb
            out[l, j] = (ssb - (big_g - 1) * ssw / (n - big_g)) / sst
    return out


def estimate_mi(x: torch.Tensor, y: torch.Tensor, steps: int = 300, lr: float = 1e-3, seed: int = 0) -> float:
    """vCLUB estimate of I(x; y) with a fresh variational net, fitted on half the pairs and
    evaluated on the other half.

    Fitting a new q for every model makes the estimate comparable across models (the q a
    model trained against could have been pushed into under-estimating); the held-out half
    keeps q's overfitting to noise from showing up as information.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = x.detach().float()
    y = y.detach().float()
    perm = torch.randperm(x.shape[0], generator=gen)
    fit, held = perm[: x.shape[0] // 2], perm[x.shape[0] // 2 :]
    est = VCLUB(x.shape[1], y.shape[1], hidden=256).to(x.device)  # the indices drawn on CPU index x on any device
    opt = torch.optim.Adam(est.parameters(), lr=lr)
    for _ in range(steps):
        idx = fit[torch.randint(len(fit), (min(len(fit), 512),), generator=gen)]
        opt.zero_grad()
        est.learning_loss(x[idx], y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float(est(x[held], y[held]))
