"""Vector and residual quantisers with the codebook hygiene every serious RQ-VAE needs.

Letters: B batch, D code width, K codebook size, L quantiser layers.

What docs/method.md §1b asks beyond the paper, and where it lives here:
- k-means initialisation on the encoded catalogue (recipes/tokenizer/train.py passes all of
  it before the first step): ``VectorQuantizer.init_from`` (k-means++
  seeding, Lloyd iterations), called layer by layer by ``ResidualQuantizer.init_from`` on
  the residuals the earlier layers leave.
- dead-code restarts: every code keeps an EMA of how often it is picked; ``restart_dead``
  moves codes whose EMA fell below a threshold onto inputs of the current batch that are
  worst served (largest quantisation error), so they start being used.
- collision resolution works on whole IDs and lives in ``collisions.py``.

Randomness: every draw takes an optional ``torch.Generator`` and is made on the device
that generator lives on (its state is there: CUDA ops refuse a CPU generator), then moved
to the data; without one, on the data's device from the global RNG (``_draw_device``).

Gradients: straight-through estimator (the quantised vector's gradient is copied to the
input), codebook and commitment losses as in VQ-VAE / RQ-VAE:
``||sg[r] - e_c||^2 + beta * ||r - sg[e_c]||^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _draw_device(x: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    """Where a random draw for data ``x`` happens: the generator's device, else the data's."""
    return x.device if generator is None else generator.device


def _noise(x: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """(n, D) Gaussian jitter at 1% of ``x``'s spread, on ``x``'s device."""
    z = torch.randn((n, x.shape[1]), generator=generator, device=_draw_device(x, generator))
    return z.to(x.device) * (x.std() * 1e-2 + 1e-6)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain k-means with k-means++ seeding on ``x`` (N, D); returns centroids (k, D).

    When N < k the points are repeated with a little noise, so every centroid sits on data
    (an unused centroid would be a dead code from the first step).
    """
    x = x.detach().float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("kmeans needs at least one point")
    if n < k:
        reps = (k + n - 1) // n
        x = x.repeat(reps, 1) + _noise(x, n * reps, generator)
        n = x.shape[0]
    # k-means++ seeding: each next centre drawn with probability proportional to D(x)^2.
    where = _draw_device(x, generator)
    first = torch.randint(n, (1,), generator=generator, device=where).to(x.device)
    centres = [x[first]]
    d2 = ((x - centres[0]) ** 2).sum(-1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        idx = torch.multinomial(probs.to(where), 1, generator=generator).to(x.device)
        centres.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(-1))
    c = torch.cat(centres, 0)  # (k, D)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)  # (N,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float().unsqueeze(1)
        empty = counts.squeeze(1) == 0
        c = torch.where(empty.unsqueeze(1), c, sums / counts.clamp(min=1))
    return c


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D) straight-through: forward value e_c, gradient to the input
    codes: torch.Tensor  # (B,) long
    loss: torch.Tensor  # scalar: codebook + beta * commitment
    distances: torch.Tensor  # (B, K) squared distances, kept for collision resolution


class VectorQuantizer(nn.Module):
    """One codebook of K entries of width D, nearest-neighbour assignment."""

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, usage_decay: float = 0.99):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.usage_decay = usage_decay
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) * 0.1)
        # EMA of the share of the batch assigned to each code; starts "healthy".
        self.register_buffer("usage", torch.full((codebook_size,), 1.0 / codebook_size))
        self.register_buffer("initialised", torch.tensor(False))

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances (B, K); expanded form, clamped at 0 against rounding."""
        cb = self.codebook
        d = (x * x).sum(-1, keepdim=True) - 2 * x @ cb.t() + (cb * cb).sum(-1).unsqueeze(0)
        return d.clamp_min(0)

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        dist = self.distances(x)  # (B, K)
        codes = dist.argmin(-1)  # (B,)
        e = self.codebook[codes]  # (B, D)
        loss = ((x.detach() - e) ** 2).sum(-1).mean() + self.beta * ((x - e.detach()) ** 2).sum(-1).mean()
        if self.training and x.shape[0] > 0:
            with torch.no_grad():
                share = torch.bincount(codes, minlength=self.codebook_size).float() / x.shape[0]
                self.usage.mul_(self.usage_decay).add_(share, alpha=1 - self.usage_decay)
        quantized = x + (e - x).detach()  # straight-through
        return QuantizerOutput(quantized, codes, loss, dist)

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference only: (codes (B,), distances (B, K)), no losses, no usage update."""
        dist = self.distances(x)
        return dist.argmin(-1), dist

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        self.codebook.data.copy_(kmeans(x, self.codebook_size, generator=generator))
        self.usage.fill_(1.0 / self.codebook_size)
        self.initialised.fill_(True)

    @torch.no_grad()
    def restart_dead(self, x: torch.Tensor, threshold: float, generator: torch.Generator | None = None) -> int:
        """Move codes whose usage EMA < ``threshold / K`` onto the worst-served inputs of ``x``.

        Returns how many codes were restarted.
        """
        dead = (self.usage < threshold / self.codebook_size).nonzero().squeeze(1)
        if dead.numel() == 0 or x.shape[0] == 0:
            return 0
        err = self.distances(x).min(-1).values  # (B,) how badly each input is served now
        order = torch.argsort(err, descending=True)
        n = dead.numel()
        pick = order[torch.arange(n, device=order.device) % order.numel()]
        self.codebook.data[dead] = x[pick] + _noise(x, n, generator)
        self.usage[dead] = 1.0 / self.codebook_size
        return int(n)


@dataclass
class ResidualOutput:
    quantized: torch.Tensor  # (B, D) sum of the chosen codewords, straight-through to the input
    codes: torch.Tensor  # (B, L)
    loss: torch.Tensor  # scalar, summed over layers
    residual: torch.Tensor  # (B, D) what is left after the last layer (codewords detached)
    layer_inputs: list[torch.Tensor]  # L x (B, D): r_0 .. r_{L-1}, the residual each layer saw
    distances: list[torch.Tensor]  # L x (B, K)


class ResidualQuantizer(nn.Module):
    """RQ: r_0 = z; c_l = argmin_k ||r_{l-1} - C_l[k]||; r_l = r_{l-1} - C_l[c_l] (docs/method.md §1b).

    ``commitment``: "per_layer" commits every layer's input to its codeword, which pulls z
    towards the *first* codeword too and so drains the residual the deeper layers need (on
    the 1,682 ML-100K items it left the second and third layers using 20-40% of their codes);
    "total" (the RQ-VAE paper, Lee et al. 2022) commits z only to the full sum, while each
    codebook still moves to the residual it serves.
    """

    def __init__(
        self,
        n_layers: int,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        usage_decay: float = 0.99,
        commitment: str = "per_layer",
    ):
        super().__init__()
        if commitment not in ("per_layer", "total"):
            raise ValueError(f"commitment must be 'per_layer' or 'total', got {commitment!r}")
        self.commitment = commitment
        self.beta = beta
        self.layers = nn.ModuleList(
            VectorQuantizer(codebook_size, dim, beta=beta, usage_decay=usage_decay) for _ in range(n_layers)
        )

    def forward(self, z: torch.Tensor) -> ResidualOutput:
        r = z
        total = torch.zeros_like(z)
        codes, inputs, dists = [], [], []
        loss = z.new_zeros(())
        for vq in self.layers:
            inputs.append(r)
            out = vq(r)
            e = vq.codebook[out.codes]
            if self.commitment == "per_layer":
                loss = loss + out.loss
            else:  # codebook term only here; the commitment term is on the sum below
                loss = loss + ((r.detach() - e) ** 2).sum(-1).mean()
            total = total + e
            codes.append(out.codes)
            dists.append(out.distances)
            r = r - e.detach()
        if self.commitment == "total":
            loss = loss + self.beta * ((z - total.detach()) ** 2).sum(-1).mean()
        quantized = z + (total - z).detach()
        return ResidualOutput(quantized, torch.stack(codes, 1), loss, r, inputs, dists)

    def assign(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference only: (codes (B, L), quantised sum (B, D), residual (B, D), last distances (B, K))."""
        r = z
        total = torch.zeros_like(z)
        codes = []
        dist = z.new_zeros(())
        for vq in self.layers:
            c, dist = vq.assign(r)
            e = vq.codebook[c]
            total = total + e
            r = r - e
            codes.append(c)
        return torch.stack(codes, 1), total, r, dist

    @torch.no_grad()
    def init_from(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        r = z.detach()
        for vq in self.layers:
            vq.init_from(r, generator=generator)
            r = r - vq.codebook[vq.distances(r).argmin(-1)]

    @torch.no_grad()
    def restart_dead(
        self, layer_inputs: list[torch.Tensor], threshold: float, generator: torch.Generator | None = None
    ) -> int:
        return sum(vq.restart_dead(x.detach(), threshold, generator) for vq, x in zip(self.layers, layer_inputs))
