"""DST, the Disentangled Semantic Tokenizer of Hi-SAM (§3.2; docs/method.md §1).

Letters: B batch, M modalities, D aligned width (256), K codebook size, L_s shared RQ layers,
N_h PSGR subspaces.

Reading order: config -> CGA projection heads (x_m -> e_m on the unit sphere) -> DMRQ
(aggregate -> shared RQ -> PSGR recovery per modality -> modality codebooks -> additive
decoders) -> losses (reconstruction, commitment, GRAM alignment, vCLUB).

Codes per item: [shared_1 .. shared_{L_s}, specific_{m_1} .. specific_{m_M}], so with three
modalities 6 codes (docs/method.md §1b).

Missing modality (documented fallback, ``missing="impute"``): CGA puts every modality on one
hypersphere, so a missing modality's aligned vector is replaced by the normalised mean of the
item's present aligned vectors. Its specific code is then what PSGR recovers with that probe.
At least one modality must be present. ``missing="error"`` refuses such items instead.

Two readings the paper leaves open, both config fields, and why our defaults differ from the
first reading in docs/method.md (measured on a synthetic catalogue with known shared and private
factors, recipes/tokenizer/testing.py; the figures are in the tokenizer report's ablation
table):
- ``recon_target``: reconstructing the *aligned* e_m cannot keep modality-private detail,
  because CGA's contrastive volume loss makes e_m of one item agree across modalities, i.e.
  it removes exactly what is private. No code then carried the private factors (their
  association with every code was 0.00). Reconstructing the raw input (standardised) keeps it.
- ``psgr_source``: unfolding the *shared* residual r = z - z_hat_s (the paper's sentence)
  leaves the specific codes nothing private to recover when z is the mean of aligned vectors:
  r holds the consensus' fine detail, not what distinguishes modality m. Unfolding each
  modality's own residual e_m - z_hat_s ("modal residual", the module's name) gave the
  diagonal pattern of Hi-SAM Fig. 3 (specific code m most associated with modality m's
  private factor), with the vCLUB term pushing shared information out of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.tokenizer.base import InputNormalizer, TokenizerStep, masked_mse, mlp
from models.tokenizer.losses import VCLUB, gram_alignment_loss
from models.tokenizer.quantize import ResidualQuantizer, VectorQuantizer


@dataclass
class DSTConfig:
    modalities: dict[str, int] = field(default_factory=lambda: {"text": 384, "behaviour": 64, "metadata": 32})
    anchor: str = "text"  # CGA anchor modality (docs/method.md §1a)
    dim: int = 256  # aligned width d
    hidden: int = 512  # projection-head / decoder hidden width
    codebook_size: int = 256  # K (lost in the paper; docs/method.md default)
    shared_layers: int = 3  # L_s
    n_subspaces: int = 4  # N_h (lost; docs/method.md default)
    aggregate: Literal["mean", "concat"] = "mean"  # z = mean(e_m), or a linear map of their concatenation
    # What PSGR unfolds: the shared branch's final residual r = z - z_hat_s (the paper's text),
    # or each modality's own residual r_m = e_m - z_hat_s ("modal residual"). See the module
    # docstring for why both exist.
    psgr_source: Literal["shared_residual", "modal_residual"] = "modal_residual"
    recon_target: Literal["aligned", "raw"] = "raw"  # compare x_hat_m with the raw input, or with e_m
    beta: float = 0.25  # commitment weight (RQ-VAE default; lost in the paper)
    commitment: Literal["per_layer", "total"] = "total"  # shared RQ; see quantize.ResidualQuantizer
    lambda_mi: float = 1.0  # weight of the vCLUB term (lost in the paper)
    lambda_align: float = 1.0  # weight of L_align while CGA trains jointly
    tau: float = 0.1  # GRAM InfoNCE temperature
    use_cga: bool = True  # ablation "w/o CGA": heads trained by reconstruction only
    use_psgr: bool = True  # ablation "w/o PSGR": uniform subspace weights instead of the probe
    # Put u_m on the unit sphere like e_m. Its scale is otherwise free (W_k is unconstrained)
    # and grew for the whole run on ML-100K, with the specific codebooks chasing it: the
    # specific commitment loss rose from ~1 to ~80 and the total loss rose after epoch 10.
    normalize_specific: bool = True
    missing: Literal["impute", "error"] = "impute"
    usage_decay: float = 0.99

    def __post_init__(self) -> None:
        if self.anchor not in self.modalities:
            raise ValueError(f"anchor modality {self.anchor!r} is not one of {list(self.modalities)}")
        if len(self.modalities) < 2:
            raise ValueError("DST needs at least two modalities")

    @property
    def code_length(self) -> int:
        return self.shared_layers + len(self.modalities)


class DST(nn.Module):
    kind = "dst"

    def __init__(self, config: DSTConfig):
        super().__init__()
        self.config = c = config
        self.names = list(c.modalities)
        self.normalizer = InputNormalizer(c.modalities)
        # CGA: per-modality projection head g_m (docs/method.md §1a).
        self.heads = nn.ModuleDict({m: mlp(w, c.hidden, c.dim) for m, w in c.modalities.items()})
        if c.aggregate == "concat":
            self.aggregate = nn.Linear(c.dim * len(self.names), c.dim)
        # DMRQ shared branch.
        self.shared = ResidualQuantizer(c.shared_layers, c.codebook_size, c.dim, c.beta, c.usage_decay, c.commitment)
        # PSGR: N_h subspace projections of the residual, one probe projection per modality.
        self.unfold = nn.Linear(c.dim, c.n_subspaces * c.dim, bias=False)
        self.probes = nn.ModuleDict({m: nn.Linear(c.dim, c.dim, bias=False) for m in self.names})
        self.specific = nn.ModuleDict(
            {m: VectorQuantizer(c.codebook_size, c.dim, c.beta, c.usage_decay) for m in self.names}
        )
        out = {m: (c.dim if c.recon_target == "aligned" else w) for m, w in c.modalities.items()}
        self.decoders = nn.ModuleDict({m: mlp(c.dim, c.hidden, out[m]) for m in self.names})
        # vCLUB variational nets q(u_m | z_hat_s); trained by their own optimiser (aux_parameters).
        self.mi = nn.ModuleDict({m: VCLUB(c.dim, c.dim, c.hidden // 2) for m in self.names})

    # ----------------------------------------------------------------------- building blocks
    def align(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """CGA: e_m = g_m(x_m) / ||g_m(x_m)||, missing modalities imputed (module docstring)."""
        e = {m: F.normalize(self.heads[m](self.normalizer(m, x[m])), dim=-1) for m in self.names}  # (B, D) each
        mask = torch.stack([present[m] for m in self.names], 1).float()  # (B, M)
        if bool((mask < 1).any()):
            stacked = torch.stack([e[m] for m in self.names], 1)  # (B, M, D)
            fill = F.normalize((stacked * mask.unsqueeze(-1)).sum(1), dim=-1)  # (B, D)
            e = {m: torch.where(present[m].unsqueeze(-1), e[m], fill) for m in self.names}
        return e

    def global_repr(self, e: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.config.aggregate == "mean":
            return torch.stack([e[m] for m in self.names], 0).mean(0)  # (B, D)
        return self.aggregate(torch.cat([e[m] for m in self.names], -1))

    def recover(
        self, r: torch.Tensor, e: dict[str, torch.Tensor], z_hat_s: torch.Tensor, probes_t: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """PSGR: h_k = W_k r; alpha_{m,k} = softmax_k(<Q_m e_m, h_k>/sqrt(D)); u_m = sum_k alpha h_k.

        All modalities in one batched pass (the unfold W_k is shared; the probes Q_m are stacked):
        the frozen single-item encode is dominated by per-op overhead, not arithmetic.
        """
        c = self.config
        b = r.shape[0]
        ee = torch.stack([e[m] for m in self.names], 0)  # (M, B, D)
        src = r.expand(len(self.names), b, c.dim) if c.psgr_source == "shared_residual" else ee - z_hat_s
        h = self.unfold(src).view(len(self.names), b, c.n_subspaces, c.dim)  # (M, B, N_h, D)
        if c.use_psgr:
            if probes_t is None:
                probes_t = torch.stack([self.probes[m].weight for m in self.names], 0).transpose(
                    1, 2
                )  # (M, D_in, D_out)
            q = torch.bmm(ee, probes_t)  # (M, B, D)
            alpha = torch.softmax(torch.einsum("mbd,mbkd->mbk", q, h) / math.sqrt(c.dim), -1)  # (M, B, N_h)
        else:
            alpha = r.new_full((len(self.names), b, c.n_subspaces), 1.0 / c.n_subspaces)
        u = torch.einsum("mbk,mbkd->mbd", alpha, h)  # (M, B, D)
        if c.normalize_specific:
            u = F.normalize(u, dim=-1)
        return {m: u[i] for i, m in enumerate(self.names)}

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> TokenizerStep:
        c = self.config
        e = self.align(x, present)
        z = self.global_repr(e)
        rq = self.shared(z)
        z_hat_s = rq.quantized  # (B, D)
        u = self.recover(rq.residual, e, z_hat_s)
        codes = [rq.codes]
        loss_commit = rq.loss
        loss_commit_specific = z.new_zeros(())
        loss_recon = z.new_zeros(())
        loss_mi = z.new_zeros(())
        layer_inputs = list(zip(self.shared.layers, rq.layer_inputs))
        recon = {}
        last_dist = None
        for m in self.names:
            q = self.specific[m](u[m])
            codes.append(q.codes.unsqueeze(1))
            loss_commit = loss_commit + q.loss
            loss_commit_specific = loss_commit_specific + q.loss.detach()
            layer_inputs.append((self.specific[m], u[m]))
            x_hat = self.decoders[m](z_hat_s + q.quantized)  # additive reconstruction
            target = e[m].detach() if c.recon_target == "aligned" else self.normalizer(m, x[m])
            recon[m] = (x_hat, target, present[m])
            loss_recon = loss_recon + masked_mse(x_hat, target, present[m])
            if c.lambda_mi > 0:
                loss_mi = loss_mi + self.mi[m](z_hat_s, u[m])
            last_dist = q.distances
        loss_align = z.new_zeros(())
        if c.use_cga and c.lambda_align > 0:
            full = torch.stack([present[m] for m in self.names], 1).all(1)
            if int(full.sum()) > 1:
                data = torch.stack([e[m][full] for m in self.names if m != c.anchor], 1)  # (B', M-1, D)
                loss_align = gram_alignment_loss(e[c.anchor][full], data, c.tau)
        loss = loss_recon + loss_commit + c.lambda_mi * loss_mi + c.lambda_align * loss_align
        terms = {
            "recon": loss_recon.detach(),
            "commit": loss_commit.detach(),
            "commit_specific": loss_commit_specific,
            "mi": loss_mi.detach(),
            "align": loss_align.detach(),
        }
        return TokenizerStep(loss, terms, torch.cat(codes, 1), last_dist, layer_inputs, recon)

    @torch.no_grad()
    def encode(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference path, no losses: (codes (B, L), last distances (B, K)).

        Same arithmetic as ``forward`` (tested equal). The single-item encode is dominated by
        per-op overhead, so the codebooks are searched with precomputed stacked constants
        (``freeze``) in as few ops as possible.
        """
        k = self._inference_constants()
        e = self.align(x, present)
        r = self.global_repr(e)
        codes, z_hat_s = [], torch.zeros_like(r)
        for book, book_sq in k["shared"]:
            c = ((r * r).sum(-1, keepdim=True) - 2 * r @ book.t() + book_sq).argmin(-1)  # (B,)
            codes.append(c.unsqueeze(1))
            z_hat_s = z_hat_s + book[c]
            r = r - book[c]
        u = self.recover(r, e, z_hat_s, k["probes"])
        uu = torch.stack([u[m] for m in self.names], 0)  # (M, B, D)
        dist = ((uu * uu).sum(-1, keepdim=True) - 2 * torch.bmm(uu, k["books_t"]) + k["books_sq"]).clamp_min(
            0
        )  # (M, B, K)
        return torch.cat([*codes, dist.argmin(-1).t()], 1), dist[-1]

    @torch.no_grad()
    def freeze(self) -> None:
        """Keep the inference constants (stacked codebooks, their norms, stacked probes).

        Only for a model whose weights no longer change (FrozenTokenizer); training never calls it.
        """
        self._frozen = None
        self._frozen = self._inference_constants()

    def _inference_constants(self) -> dict:
        frozen = getattr(self, "_frozen", None)
        if frozen is not None:
            return frozen
        books = torch.stack([self.specific[m].codebook for m in self.names], 0)  # (M, K, D)
        return {
            "shared": [(vq.codebook, (vq.codebook * vq.codebook).sum(-1).unsqueeze(0)) for vq in self.shared.layers],
            "books_t": books.transpose(1, 2).contiguous(),  # (M, D, K)
            "books_sq": (books * books).sum(-1).unsqueeze(1),  # (M, 1, K)
            "probes": torch.stack([self.probes[m].weight for m in self.names], 0)
            .transpose(1, 2)
            .contiguous(),  # (M, D_in, D_out)
        }

    # ---------------------------------------------------------------- training hooks
    def aux_parameters(self) -> list[nn.Parameter]:
        """Parameters of the vCLUB variational nets: their own optimiser, alternating updates."""
        return list(self.mi.parameters())

    def main_parameters(self) -> list[nn.Parameter]:
        aux = {id(p) for p in self.aux_parameters()}
        return [p for p in self.parameters() if id(p) not in aux]

    def aux_loss(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fit q(u_m | z_hat_s) on positive pairs, tokenizer detached (the 'q' half of the alternation)."""
        with torch.no_grad():
            z_hat_s, u = self.shared_and_specific(x, present)
        return sum(self.mi[m].learning_loss(z_hat_s, u[m]) for m in self.names)

    @torch.no_grad()
    def init_codebooks(
        self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> None:
        """k-means initialisation, layer by layer, on what each quantiser will see."""
        self.normalizer.fit(x, present)
        e = self.align(x, present)
        z = self.global_repr(e)
        self.shared.init_from(z, generator)
        rq = self.shared(z)
        u = self.recover(rq.residual, e, rq.quantized)
        for m in self.names:
            self.specific[m].init_from(u[m], generator)

    @torch.no_grad()
    def refit_codebooks(
        self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> None:
        """Final k-means pass of every codebook on what it now sees (train.TrainConfig.refit)."""
        e = self.align(x, present)
        z = self.global_repr(e)
        self.shared.init_from(z, generator)
        _, z_hat_s, r, _ = self.shared.assign(z)
        u = self.recover(r, e, z_hat_s)
        for m in self.names:
            self.specific[m].init_from(u[m], generator)

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoders.parameters())

    def shared_and_specific(
        self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(z_hat_s, {m: u_m}): the two parts whose mutual information vCLUB bounds."""
        e = self.align(x, present)
        rq = self.shared(self.global_repr(e))
        return rq.quantized, self.recover(rq.residual, e, rq.quantized)

    def code_modalities(self) -> list[str]:
        """What each code position is: 'shared' or the modality whose specific codebook it is."""
        return ["shared"] * self.config.shared_layers + self.names
