"""What every semantic-ID tokenizer here shares: input normalisation and the step output.

Letters: B batch, L code length (codes per item), K codebook size, D width.

A tokenizer maps per-modality raw embeddings ``x[name]`` (B, D_name) with presence masks
``present[name]`` (B,) bool to L integer codes per item. All three tokenizers (DST,
MACRec-style, plain RQ-VAE) produce the same code length so that they are compared at equal
code length (docs/method.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TokenizerStep:
    """Output of one forward pass of a tokenizer."""

    loss: torch.Tensor  # scalar the tokenizer's optimiser minimises
    terms: dict[str, torch.Tensor]  # named loss terms, detached, for logging
    codes: torch.Tensor  # (B, L) long, local codes in [0, K)
    last_distances: torch.Tensor  # (B, K) distances of the last layer's input to its codebook
    layer_inputs: list[tuple[nn.Module, torch.Tensor]] = field(
        default_factory=list
    )  # (quantiser, its input) for restarts
    recon: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )  # name -> (x_hat, target, rows)


class InputNormalizer(nn.Module):
    """Per-modality standardisation with statistics of the training items, kept in the artifact.

    Raw encoders differ in scale by orders of magnitude (unit-norm sentence embeddings,
    multi-hot metadata, SVD factors); without this the loss would be dominated by one of them.
    """

    def __init__(self, modalities: dict[str, int]):
        super().__init__()
        self.names = list(modalities)
        for name, width in modalities.items():
            self.register_buffer(f"mean_{name}", torch.zeros(width))
            self.register_buffer(f"std_{name}", torch.ones(width))

    @torch.no_grad()
    def fit(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> None:
        for name in self.names:
            rows = x[name][present[name]]
            if rows.shape[0] == 0:
                continue
            getattr(self, f"mean_{name}").copy_(rows.mean(0))
            # One scale per modality (not per dimension), so that near-constant dims of
            # multi-hot inputs are not blown up into noise.
            getattr(self, f"std_{name}").fill_(float(rows.std(0).pow(2).mean().sqrt().clamp_min(1e-6)))

    def forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return (x - getattr(self, f"mean_{name}")) / getattr(self, f"std_{name}")


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def masked_mse(x_hat: torch.Tensor, target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over present rows of the squared error summed over dims; 0 when no row is present."""
    if not bool(rows.any()):
        return x_hat.new_zeros(())
    return ((x_hat[rows] - target[rows]) ** 2).sum(-1).mean()
