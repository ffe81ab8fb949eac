"""Losses of the tokenizers: GRAM volume alignment (CGA), vCLUB mutual-information bound, InfoNCE.

Letters: B batch, M modalities, D aligned width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def small_det(g: torch.Tensor) -> torch.Tensor:
    """Determinant of (..., M, M): closed form for M <= 3 (cheap forward and backward for the
    B*B Gram matrices of a batch), LU otherwise."""
    m = g.shape[-1]
    if m == 1:
        return g[..., 0, 0]
    if m == 2:
        return g[..., 0, 0] * g[..., 1, 1] - g[..., 0, 1] * g[..., 1, 0]
    if m == 3:
        a, b, c = g[..., 0, 0], g[..., 0, 1], g[..., 0, 2]
        d, e, f = g[..., 1, 0], g[..., 1, 1], g[..., 1, 2]
        h, i, j = g[..., 2, 0], g[..., 2, 1], g[..., 2, 2]
        return a * (e * j - f * i) - b * (d * j - f * h) + c * (d * i - e * h)
    return torch.linalg.det(g)


def gram_volume(vectors: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Volume of the parallelotope spanned by M vectors: sqrt(det G), G = A A^T (docs/method.md §1a).

    ``vectors``: (..., M, D). Returns (...). ``eps`` keeps sqrt differentiable at a volume of
    zero (identical vectors), where the gradient of sqrt would be infinite.
    """
    gram = vectors @ vectors.transpose(-1, -2)  # (..., M, M)
    det = small_det(gram.float())
    return torch.sqrt(det.clamp_min(0) + eps)


def pairwise_anchor_volumes(anchor: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """V[i, j] = volume of item i's anchor with item j's data modalities.

    anchor: (B, D); data: (B, M-1, D) (all unit norm). Returns (B, B).
    The Gram matrix of [a_i, d_j^1 .. d_j^{M-1}] is assembled from inner products instead of
    materialising B*B*M vectors: only <a_i, d_j^k> depends on the pair.
    """
    b, m1, _ = data.shape
    ad = torch.einsum("id,jkd->ijk", anchor, data)  # (B, B, M-1) <a_i, d_j^k>
    dd = data @ data.transpose(1, 2)  # (B, M-1, M-1) <d_j^k, d_j^l>
    aa = (anchor * anchor).sum(-1)  # (B,)
    g = anchor.new_empty(b, b, m1 + 1, m1 + 1)
    g[:, :, 0, 0] = aa.unsqueeze(1)
    g[:, :, 0, 1:] = ad
    g[:, :, 1:, 0] = ad
    g[:, :, 1:, 1:] = dd.unsqueeze(0)
    det = small_det(g.float())
    return torch.sqrt(det.clamp_min(0) + 1e-8)


def gram_alignment_loss(anchor: torch.Tensor, data: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE on negative volumes (GRAM, Cicchetti et al. 2025; docs/method.md §1a).

    L_D2A: for anchor i, the positive is its own data j = i among all j;
    L_A2D: for data i, the positive is its own anchor among all anchors.
    """
    logits = -pairwise_anchor_volumes(anchor, data) / tau  # (B, B), row = anchor i, col = data j
    target = torch.arange(anchor.shape[0], device=anchor.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def info_nce(query: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE with cosine similarity; ``positive`` (B, B) bool marks the positives of each row.

    Rows without a positive are ignored (they carry no signal); returns 0 when none has one.
    Several positives per row are averaged in log space (SupCon-style).
    """
    q = F.normalize(query, dim=-1)
    k = F.normalize(keys, dim=-1)
    logits = q @ k.t() / tau  # (B, B)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = positive.sum(1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return query.new_zeros(())
    per_row = (log_prob * positive).sum(1)[valid] / n_pos[valid]
    return -per_row.mean()


class VCLUB(nn.Module):
    """vCLUB upper bound on I(x; y) (Cheng et al. 2020; docs/method.md §1b).

    q(y|x) = N(mu(x), diag sigma^2(x)). Two uses, alternated by the trainer:
    - ``learning_loss`` (x, y detached) trains q to fit the positive pairs;
    - ``forward`` is the bound 1/B sum_i [log q(y_i|x_i) - 1/B sum_j log q(y_j|x_i)], minimised by
      the tokenizer with q's parameters held still.
    The log-variance terms cancel between the two sums, so they are left out of the bound.
    """

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 256):
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim), nn.Tanh())

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.mu(x), self.logvar(x)
        inv_var = torch.exp(-logvar)  # (B, D)
        positive = -0.5 * ((mu - y) ** 2 * inv_var).sum(-1)  # (B,)
        # mean_j (y_j - mu_i)^2 = mean_j y_j^2 - 2 mu_i mean_j y_j + mu_i^2, per dimension: O(B D).
        y_mean = y.mean(0, keepdim=True)
        y2_mean = (y * y).mean(0, keepdim=True)
        negative = -0.5 * ((y2_mean - 2 * mu * y_mean + mu * mu) * inv_var).sum(-1)  # (B,)
        return (positive - negative).mean()

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.mu(x), self.logvar(x)
        return (-0.5 * ((mu - y) ** 2 * torch.exp(-logvar) + logvar)).sum(-1).mean()

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.log_likelihood(x.detach(), y.detach())
