"""The two tokenizers DST must beat, at equal code length (docs/method.md §1-§2).

Letters: B batch, M modalities, D latent width, K codebook size, L layers.

- ``RQVAE``: the plain RQ-VAE of TIGER (Rajput et al. 2023): the modalities concatenated, one
  encoder, L residual layers, one decoder. No alignment, no disentanglement.
- ``MACRec``: MACRec's cross-modal quantisation (docs/method.md §2): one RQ per
  modality, an InfoNCE at each layer over one modality's residuals whose positives are the
  in-batch items sharing the *other* modality's k-means pseudo-label, and an InfoNCE that aligns
  the quantised vectors of one item across modalities. The paper has two modalities and 4
  layers each; with M modalities and a budget of L codes each modality gets L / M layers, and
  "the other modality" of modality m is the next one, cyclically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.tokenizer.base import InputNormalizer, TokenizerStep, masked_mse, mlp
from models.tokenizer.losses import info_nce
from models.tokenizer.quantize import ResidualQuantizer, kmeans


def _modalities_default() -> dict[str, int]:
    return {"text": 384, "behaviour": 64, "metadata": 32}


@dataclass
class RQVAEConfig:
    modalities: dict[str, int] = field(default_factory=_modalities_default)
    dim: int = 256
    hidden: int = 512
    codebook_size: int = 256
    n_layers: int = 6  # equal code length with DST's 3 shared + 3 specific
    beta: float = 0.25
    commitment: str = "total"  # same RQ as DST's shared branch (quantize.ResidualQuantizer)
    usage_decay: float = 0.99

    @property
    def code_length(self) -> int:
        return self.n_layers


class RQVAE(nn.Module):
    kind = "rqvae"

    def __init__(self, config: RQVAEConfig):
        super().__init__()
        self.config = c = config
        self.names = list(c.modalities)
        self.widths = [c.modalities[m] for m in self.names]
        self.normalizer = InputNormalizer(c.modalities)
        self.encoder = mlp(sum(self.widths), c.hidden, c.dim)
        self.rq = ResidualQuantizer(c.n_layers, c.codebook_size, c.dim, c.beta, c.usage_decay, c.commitment)
        self.decoder = mlp(c.dim, c.hidden, sum(self.widths))

    def _inputs(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
        # A missing modality enters as zeros after standardisation, i.e. as the catalogue mean.
        parts = [self.normalizer(m, x[m]) * present[m].unsqueeze(-1) for m in self.names]
        return torch.cat(parts, -1)  # (B, sum D_m)

    def forward(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> TokenizerStep:
        inp = self._inputs(x, present)
        out = self.rq(self.encoder(inp))
        x_hat = self.decoder(out.quantized)
        recon, loss_recon, start = {}, inp.new_zeros(()), 0
        for m, w in zip(self.names, self.widths):
            sl = slice(start, start + w)
            start += w
            recon[m] = (x_hat[:, sl], inp[:, sl], present[m])
            loss_recon = loss_recon + masked_mse(x_hat[:, sl], inp[:, sl], present[m])
        loss = loss_recon + out.loss
        terms = {"recon": loss_recon.detach(), "commit": out.loss.detach()}
        return TokenizerStep(
            loss, terms, out.codes, out.distances[-1], list(zip(self.rq.layers, out.layer_inputs)), recon
        )

    @torch.no_grad()
    def encode(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        codes, _, _, dist = self.rq.assign(self.encoder(self._inputs(x, present)))
        return codes, dist

    @torch.no_grad()
    def init_codebooks(
        self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> None:
        self.normalizer.fit(x, present)
        self.rq.init_from(self.encoder(self._inputs(x, present)), generator)

    @torch.no_grad()
    def refit_codebooks(
        self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> None:
        self.rq.init_from(self.encoder(self._inputs(x, present)), generator)

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    def code_modalities(self) -> list[str]:
        return ["shared"] * self.config.n_layers


@dataclass
class MACRecConfig:
    modalities: dict[str, int] = field(default_factory=_modalities_default)
    dim: int = 256
    hidden: int = 512
    codebook_size: int = 256
    layers_per_modality: int = 2  # 3 modalities x 2 = 6 codes (the paper: 2 x 4)
    n_pseudo_labels: int = 512  # k-means clusters on each modality's raw embeddings
    lambda_con: tuple[float, ...] = (0.0, 0.1)  # per layer; the paper's (0, 0, 0.1, 0.1) folded to 2 layers
    lambda_align: float = 0.001
    tau: float = 0.1
    beta: float = 0.25
    commitment: str = "total"
    usage_decay: float = 0.99

    def __post_init__(self) -> None:
        if len(self.lambda_con) != self.layers_per_modality:
            raise ValueError(
                f"lambda_con needs one weight per layer ({self.layers_per_modality}), got {self.lambda_con}"
            )
        self.lambda_con = tuple(self.lambda_con)

    @property
    def code_length(self) -> int:
        return self.layers_per_modality * len(self.modalities)


class MACRec(nn.Module):
    kind = "macrec"

    def __init__(self, config: MACRecConfig):
        super().__init__()
        self.config = c = config
        self.names = list(c.modalities)
        self.normalizer = InputNormalizer(c.modalities)
        self.encoders = nn.ModuleDict({m: mlp(w, c.hidden, c.dim) for m, w in c.modalities.items()})
        self.rqs = nn.ModuleDict(
            {
                m: ResidualQuantizer(c.layers_per_modality, c.codebook_size, c.dim, c.beta, c.usage_decay, c.commitment)
                for m in self.names
            }
        )
        self.decoders = nn.ModuleDict({m: mlp(c.dim, c.hidden, w) for m, w in c.modalities.items()})
        # Pseudo-label centroids per modality (k-means on standardised raw embeddings), set at init.
        for m, w in c.modalities.items():
            self.register_buffer(f"centroids_{m}", torch.zeros(c.n_pseudo_labels, w))

    def pseudo_labels(self, m: str, xn: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Nearest k-means centroid of modality m; -1 where the modality is missing."""
        labels = torch.cdist(xn, getattr(self, f"centroids_{m}")).argmin(-1)
        return torch.where(present, labels, torch.full_like(labels, -1))

    def forward(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> TokenizerStep:
        c = self.config
        xn = {m: self.normalizer(m, x[m]) * present[m].unsqueeze(-1) for m in self.names}
        outs = {m: self.rqs[m](self.encoders[m](xn[m])) for m in self.names}
        labels = {m: self.pseudo_labels(m, xn[m], present[m]) for m in self.names}
        b = next(iter(xn.values())).shape[0]
        not_self = ~torch.eye(b, dtype=torch.bool, device=xn[self.names[0]].device)
        loss_recon = loss_commit = loss_con = loss_align = xn[self.names[0]].new_zeros(())
        recon, codes, layer_inputs = {}, [], []
        for i, m in enumerate(self.names):
            out = outs[m]
            other = self.names[(i + 1) % len(self.names)]
            codes.append(out.codes)
            layer_inputs.extend(zip(self.rqs[m].layers, out.layer_inputs))
            loss_commit = loss_commit + out.loss
            x_hat = self.decoders[m](out.quantized)
            recon[m] = (x_hat, xn[m], present[m])
            loss_recon = loss_recon + masked_mse(x_hat, xn[m], present[m])
            lab = labels[other]
            positive = (
                (lab.unsqueeze(0) == lab.unsqueeze(1)) & (lab.unsqueeze(1) >= 0) & not_self & present[m].unsqueeze(0)
            )
            for layer, weight in enumerate(c.lambda_con):
                if weight > 0:
                    r = out.layer_inputs[layer]
                    loss_con = loss_con + weight * info_nce(r, r, positive, c.tau)
            both = present[m] & present[other]
            if c.lambda_align > 0 and int(both.sum()) > 1:
                a, v = out.quantized[both], outs[other].quantized[both]
                eye = torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
                loss_align = loss_align + 0.5 * (info_nce(a, v, eye, c.tau) + info_nce(v, a, eye, c.tau))
        loss = loss_recon + loss_commit + loss_con + c.lambda_align * loss_align
        terms = {
            "recon": loss_recon.detach(),
            "commit": loss_commit.detach(),
            "con": loss_con.detach(),
            "align": loss_align.detach(),
        }
        last = outs[self.names[-1]].distances[-1]
        return TokenizerStep(loss, terms, torch.cat(codes, 1), last, layer_inputs, recon)

    @torch.no_grad()
    def encode(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        codes, dist = [], None
        for m in self.names:
            xn = self.normalizer(m, x[m]) * present[m].unsqueeze(-1)
            c, _, _, dist = self.rqs[m].assign(self.encoders[m](xn))
            codes.append(c)
        return torch.cat(codes, 1), dist

    @torch.no_grad()
    def init_codebooks(
        self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> None:
        self.normalizer.fit(x, present)
        for m in self.names:
            xn = self.normalizer(m, x[m])
            rows = xn[present[m]]
            k = min(self.config.n_pseudo_labels, max(1, rows.shape[0]))
            cents = kmeans(rows, k, generator=generator)
            buf = getattr(self, f"centroids_{m}")
            buf.zero_()
            buf[:k] = cents
            if k < buf.shape[0]:  # fewer items than clusters: unused centroids far away, never nearest
                buf[k:] = 1e6
            self.rqs[m].init_from(self.encoders[m](xn * present[m].unsqueeze(-1)), generator)

    @torch.no_grad()
    def refit_codebooks(
        self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> None:
        for m in self.names:
            xn = self.normalizer(m, x[m]) * present[m].unsqueeze(-1)
            self.rqs[m].init_from(self.encoders[m](xn), generator)

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoders.parameters())

    def code_modalities(self) -> list[str]:
        return [m for m in self.names for _ in range(self.config.layers_per_modality)]
