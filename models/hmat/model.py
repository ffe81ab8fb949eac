"""HMAT, the Hierarchical Memory-Anchor Transformer (docs/method.md §3; Hi-SAM §3.3), top to bottom.

Letters: B batch, S tokens of the stream being run, Sk keys (cached slots + S), C hidden
width, H query heads, G key/value heads (GQA), D head dim, V vocabulary, A action types.
(T is kept for history items, as in docs/method.md.)

Reading order: config and presets, RMSNorm, H-RoPE, attention (the reference oracle, SDPA
under a dense mask, and the structured paths of attention.py), SwiGLU MLP, pre-norm block,
the model with its two heads:
- ``action_head``: logits over the A action types, read at anchor positions; the score of
  an item is P(positive action | its anchor) (docs/method.md §3 SFT, §4 ranking);
- ``lm_head``: logits over the token vocabulary for PT next-token prediction (docs/method.md §3).

The stream itself (tokens, coordinates, metadata) is built in sequence.py and the mask in
mask.py; ``HMAT.forward`` takes plain tensors so that the cache (inference.py) can run any
slice of a stream against cached keys and values. The mask travels as a dense tensor or as
one of its structures (mask.py), and the structure picks the attention path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.hmat.anchor_op import anchor_attention, cached_block_anchor_attention
from models.hmat.attention import (
    FlexBlocks,
    LayerKV,
    cached_block_attention,
    causal_attention,
    flex_attention_blocks,
    flex_available,
    flex_blocks,
    structured_attention,
)
from models.hmat.mask import CachedBlocks, PlainCausal, StreamBlocks, attention_mask, plain_causal, stream_blocks
from models.hmat.sequence import StreamLayout, TokenStream

# How a whole stream (training, the full forward) is attended (HMAT.stream_attention_mask):
# "reference": the explicit fp32 oracle under the dense mask; "sdpa": SDPA under the dense mask;
# "structured": mask.StreamBlocks through attention.structured_attention (pure PyTorch, CPU);
# "flex": FlexAttention over memory-first keys (CUDA); "auto": the path chosen for the stream's
# device (resolve_attn_impl). "custom_op": torch.ops.hisam.anchor_attention and
# hisam::cached_block_attention (models/hmat/anchor_op.py), the path ONNX export takes so that
# attention becomes one custom-domain node; inference only.
AttnImpl = Literal["auto", "reference", "sdpa", "structured", "flex", "custom_op"]
ATTN_IMPLS: tuple[str, ...] = ("auto", "reference", "sdpa", "structured", "flex", "custom_op")
RopeKind = Literal["hrope", "rope1d"]
StreamMask = torch.Tensor | CachedBlocks | StreamBlocks | FlexBlocks | PlainCausal


@dataclass
class HMATConfig:
    """HMAT hyper-parameters; defaults are Hi-SAM-Small (docs/method.md §3, paper App. B.2)."""

    # Vocabulary (sequence.StreamLayout): k semantic IDs per item from codebooks of size K.
    n_sid: int = 6
    codebook_size: int = 256
    profile_vocab_size: int = 1024
    n_actions: int = 2  # 0 negative, 1 positive (docs/method.md §5: rating > 3 is positive)
    positive_action: int = 1
    max_items: int = 300  # max history T (docs/method.md §3)
    max_profile_len: int = 32
    # Trunk.
    n_layer: int = 4
    hidden: int = 512
    n_head: int = 8
    n_kv_head: int = 2
    ffn: int = 2560
    dropout: float = 0.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True  # lm_head shares the token embedding (nanoGPT)
    # Positions (docs/method.md §3 H-RoPE; "rope1d" is the 1-D RoPE ablation of §5).
    rope: RopeKind = "hrope"
    rope_inter_fraction: float = 0.5  # share of each head's rotary dims given to i (lost in the paper)
    rope_base_inter: float = 10000.0
    rope_base_intra: float = 100.0
    # Attention (docs/method.md §3 MA-Attn; ma_attn=False is the "w/o MA-Attn" ablation).
    ma_attn: bool = True
    action_is_memory: bool = True  # an earlier item's anchor AND action are its memory
    attn_impl: AttnImpl = "auto"

    def __post_init__(self) -> None:
        if self.hidden % self.n_head:
            raise ValueError(f"hidden={self.hidden} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head} (GQA)")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if not 0.0 <= self.rope_inter_fraction <= 1.0:
            raise ValueError(f"rope_inter_fraction={self.rope_inter_fraction} is outside [0, 1]")
        if not 0 <= self.positive_action < self.n_actions:
            raise ValueError(f"positive_action={self.positive_action} is not one of {self.n_actions} action types")
        if self.rope not in ("hrope", "rope1d"):
            raise ValueError(f"rope={self.rope!r} is not 'hrope' or 'rope1d'")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r} is not one of {ATTN_IMPLS}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_head

    @property
    def rope_inter_dims(self) -> int:
        """Rotary dims per head driven by i; the rest are driven by j. Even, so both halves rotate in pairs."""
        if self.rope == "rope1d":
            return self.head_dim
        return 2 * round(self.head_dim * self.rope_inter_fraction / 2)

    @property
    def layout(self) -> StreamLayout:
        return StreamLayout(
            self.n_sid,
            self.codebook_size,
            self.profile_vocab_size,
            self.n_actions,
            self.max_items,
            self.max_profile_len,
        )

    @property
    def vocab_size(self) -> int:
        return self.layout.vocab_size


def hmat_small() -> HMATConfig:
    """Hi-SAM-Small: 4 layers, hidden 512, FFN 2560, GQA 8 query / 2 KV heads."""
    return HMATConfig()


def hmat_large() -> HMATConfig:
    """Hi-SAM-Large: the small model at 12 layers (paper §4, scalability)."""
    return HMATConfig(n_layer=12)


def hmat_cpu() -> HMATConfig:
    """A model small enough for CPU tests and demos; same vocabulary as the real ones."""
    return HMATConfig(n_layer=2, hidden=64, n_head=4, n_kv_head=2, ffn=160)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 (as Llama)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_hrope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inter_dims: int) -> torch.Tensor:
    """Rotate ``x`` (B, H, S, D) by H-RoPE; ``cos``/``sin`` (B, 1, S, D) from ``HRoPE``.

    Convention: rotate-half (GPT-NeoX / Hugging Face Llama), applied separately to each
    subspace: dims [0, inter_dims) rotate by i, dims [inter_dims, D) by j, and inside each
    subspace dim m pairs with dim m + half. Since every pair rotates by its own coordinate,
    a query-key score depends only on (i_q - i_k, j_q - j_k) and splits into an inter-item
    and an intra-item term (docs/method.md §3; paper App. A.3). Computed in fp32.
    """
    xf = x.float()
    rotated = torch.cat([rotate_half(xf[..., :inter_dims]), rotate_half(xf[..., inter_dims:])], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class HRoPE(nn.Module):
    """Cos/sin tables for the two coordinates, as non-persistent fp32 buffers.

    hrope: i uses base ``rope_base_inter`` on the first ``rope_inter_dims`` dims, j uses
    base ``rope_base_intra`` on the rest. rope1d: one flat position on all dims with base
    ``rope_base_inter`` (the second coordinate then drives zero dims).
    """

    cos_a: torch.Tensor
    sin_a: torch.Tensor
    cos_b: torch.Tensor
    sin_b: torch.Tensor

    def __init__(self, config: HMATConfig) -> None:
        super().__init__()
        self.inter_dims = config.rope_inter_dims
        layout = config.layout
        n_first = (layout.max_flat if config.rope == "rope1d" else layout.max_i) + 1
        cos_a, sin_a = self._table(n_first, self.inter_dims, config.rope_base_inter)
        cos_b, sin_b = self._table(layout.max_j + 1, config.head_dim - self.inter_dims, config.rope_base_intra)
        self.register_buffer("cos_a", cos_a, persistent=False)  # (N_a, D_a)
        self.register_buffer("sin_a", sin_a, persistent=False)
        self.register_buffer("cos_b", cos_b, persistent=False)  # (N_b, D - D_a)
        self.register_buffer("sin_b", sin_b, persistent=False)

    @staticmethod
    def _table(n_pos: int, dims: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = base ** (-torch.arange(0, dims, 2, dtype=torch.float64) / max(dims, 1))  # (dims/2,)
        angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (N, dims/2)
        angles = torch.cat([angles, angles], dim=-1)  # (N, dims): rotate-half pairs m and m + dims/2
        return angles.cos().float(), angles.sin().float()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` (B, S, 2) -> cos, sin (B, 1, S, D)."""
        a, b = positions[..., 0], positions[..., 1]  # (B, S)
        n_a, n_b = self.cos_a.shape[0], self.cos_b.shape[0]
        if (
            not torch.compiler.is_compiling()
            and a.numel()
            and (int(a.max()) >= n_a or int(b.max()) >= n_b or int(positions.min()) < 0)
        ):
            raise ValueError(f"rotary coordinates out of range: first in [0, {n_a}), second in [0, {n_b})")
        cos = torch.cat([self.cos_a[a], self.cos_b[b]], dim=-1)  # (B, S, D)
        sin = torch.cat([self.sin_a[a], self.sin_b[b]], dim=-1)
        return cos[:, None], sin[:, None]  # (B, 1, S, D)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, G, S, D) -> (B, G * n_rep, S, D): each KV head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """The oracle: explicit fp32 softmax(q k^T / sqrt(D) + mask) v.

    q (B, H, S, D), k/v (B, H, Sk, D), mask (B, 1, S, Sk) bool with True = may attend.
    """
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, S, Sk)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(scores.softmax(-1), p=dropout_p)
    return (probs @ v.float()).to(q.dtype)  # (B, H, S, D)


def resolve_attn_impl(attn_impl: AttnImpl, device: torch.device) -> AttnImpl:
    """``"auto"`` -> the whole-stream path to use on ``device``; any other name as given.

    CPU: the structured path (chunked fused SDPA), 1.6-1.9x the flat transformer's SFT tokens/s at
    the CPU preset where the dense mask gave 1.0x (``hisam bench ranker``). CUDA: SDPA under the
    dense mask, the path measured on an H200 before the structured and FlexAttention paths existed;
    those two are exact (tests/models/test_hmat_attention.py) but their CUDA speed is not measured
    yet (``hisam bench gpu`` compares the three; a first try saw FlexAttention's compile run past
    150 s at batch 32, T = 300), so they are chosen explicitly (``attn_impl``) until it is.
    """
    if attn_impl == "flex" and not flex_available(device):
        raise ValueError(f"attn_impl='flex' needs CUDA and torch's FlexAttention, not {device}")
    if attn_impl != "auto":
        return attn_impl
    return "sdpa" if device.type == "cuda" else "structured"


class Attention(nn.Module):
    """GQA self-attention with H-RoPE over [cached keys, new keys] under an explicit mask."""

    def __init__(self, config: HMATConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.inter_dims = config.rope_inter_dims
        self.q_proj = nn.Linear(config.hidden, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.hidden, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: StreamMask,
        past: LayerKV | None,
        attn_impl: AttnImpl,
    ) -> tuple[torch.Tensor, LayerKV]:
        """x (B, S, C); mask (B, S, Sk) or one of its structures (mask.py), which then picks the
        path (``attn_impl`` chooses among the dense-mask kernels, and the op for ``CachedBlocks``).
        Returns the output and this call's rotated K/V."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = self.k_proj(x).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, G, S, D)
        v = self.v_proj(x).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, G, S, D)
        q = apply_hrope(q, cos, sin, self.inter_dims)
        k = apply_hrope(k, cos, sin, self.inter_dims)
        y = self._attend(q, k, v, mask, past, attn_impl)  # (B, H, S, D)
        y = y.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim)  # (B, S, H * D)
        return self.resid_dropout(self.o_proj(y)), (k, v)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: StreamMask,
        past: LayerKV | None,
        attn_impl: AttnImpl,
    ) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        if attn_impl == "custom_op" and self.training:
            raise ValueError("attn_impl='custom_op' is for inference: it has no dropout and no autograd formula")
        if isinstance(mask, CachedBlocks):  # candidates against an anchor cache (inference.score_with_cache)
            if past is None:
                raise ValueError("a CachedBlocks mask needs the cached keys/values")
            if attn_impl == "custom_op":  # export: one hisam.CachedBlockAttention node
                return cached_block_anchor_attention(q, k, v, past[0], past[1], mask.slot_valid, mask.block)
            return cached_block_attention(q, k, v, past, mask)
        if not isinstance(mask, torch.Tensor):  # a whole stream's structure: no cache
            if past is not None:
                raise ValueError(f"a {type(mask).__name__} mask attends the stream itself, not cached keys")
            if isinstance(mask, StreamBlocks):
                return structured_attention(q, k, v, mask, dropout_p)
            if isinstance(mask, FlexBlocks):
                if dropout_p:
                    raise ValueError("attn_impl='flex' has no attention dropout; use 'structured'")
                return flex_attention_blocks(q, k, v, mask)
            return causal_attention(q, k, v, dropout_p)
        # Cached keys were rotated at their own logical coordinates when they were computed,
        # so they are concatenated as they are (inference.py, position map).
        k_all = k if past is None else torch.cat([past[0], k], dim=2)  # (B, G, Sk, D)
        v_all = v if past is None else torch.cat([past[1], v], dim=2)  # (B, G, Sk, D)
        if attn_impl == "custom_op":  # GQA handled inside the op: K/V stay at G heads
            return anchor_attention(q, k_all, v_all, mask)  # (B, H, S, D)
        n_rep = self.n_head // self.n_kv_head
        k_rep, v_rep = repeat_kv(k_all, n_rep), repeat_kv(v_all, n_rep)  # (B, H, Sk, D)
        if attn_impl == "reference":
            return reference_attention(q, k_rep, v_rep, mask[:, None], dropout_p)
        return F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask[:, None], dropout_p=dropout_p)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: HMATConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.ffn, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.ffn, bias=False)
        self.down_proj = nn.Linear(config.ffn, config.hidden, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: HMATConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: StreamMask,
        past: LayerKV | None,
        attn_impl: AttnImpl,
    ) -> tuple[torch.Tensor, LayerKV]:
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, past, attn_impl)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, kv


def check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` naming the first (batch, position) whose id is outside [0, V)."""
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bool(bad.any()):
        b, s = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"token id {int(tokens[b, s])} at batch {b}, position {s} is outside the vocabulary [0, {vocab_size})"
        )


class HMAT(nn.Module):
    """Decoder-only ranker over semantic-ID streams (docs/method.md §3)."""

    def __init__(self, config: HMATConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden)
        self.drop = nn.Dropout(config.dropout)
        self.rope = HRoPE(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.hidden, config.norm_eps)
        self.action_head = nn.Linear(config.hidden, config.n_actions, bias=True)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # GPT-2 / nanoGPT: scale residual output projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: StreamMask,
        past: list[LayerKV] | None = None,
        attn_impl: AttnImpl | None = None,
    ) -> tuple[torch.Tensor, list[LayerKV]]:
        """Run S tokens, optionally after cached keys/values.

        tokens (B, S) vocabulary ids; positions (B, S, 2) rotary coordinates
        (``TokenStream.rotary_positions``); mask (B, S, Sk) from ``attention_mask`` where
        Sk = cached slots + S, or its structure (``CachedBlocks`` after a cache, or
        ``stream_attention_mask``'s for a whole stream); ``past`` per layer (keys, values)
        (B, G, Sk - S, D).
        Returns the final-normed hidden states (B, S, C) and, per layer, the rotated
        keys and values (B, G, S, D) of these S tokens only, for the caller to cache.
        """
        if not torch.compiler.is_compiling():
            check_tokens(tokens, self.config.vocab_size)
        impl = attn_impl or self.config.attn_impl
        cos, sin = self.rope(positions)  # (B, 1, S, D)
        x = self.drop(self.tok_emb(tokens))  # (B, S, C)
        present = []
        for layer, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, mask, None if past is None else past[layer], impl)
            present.append(kv)
        return self.norm(x), present

    def stream_mask(self, query: TokenStream, key: TokenStream, causal: bool = False) -> torch.Tensor:
        """The mask this model uses: MA-Attn unless ``causal`` (PT) or the ``ma_attn=False`` ablation."""
        return attention_mask(
            query, key, memory_anchor=self.config.ma_attn and not causal, action_is_memory=self.config.action_is_memory
        )

    def stream_attention_mask(
        self, stream: TokenStream, causal: bool = False, attn_impl: AttnImpl | None = None
    ) -> StreamMask:
        """The mask of ``stream`` over itself, in the form its attention path reads.

        ``stream`` comes from ``build_stream`` (right-padded, ``order`` = position). Built once
        per forward and shared by the layers (and the backward). With "sdpa", "structured" or
        "flex" (and "auto", which picks one of them), a stream without candidates under the
        plain causal rule (PT, the ``ma_attn=False`` ablation) takes SDPA's mask-free
        ``is_causal`` kernels; otherwise "structured" gives ``StreamBlocks``, "flex"
        ``FlexBlocks`` (not under dropout, which FlexAttention lacks: then ``StreamBlocks``),
        and "sdpa" and "reference" the dense (B, S, S) ``attention_mask``.
        """
        impl = resolve_attn_impl(attn_impl or self.config.attn_impl, stream.tokens.device)
        memory_anchor = self.config.ma_attn and not causal
        if impl in ("sdpa", "structured", "flex") and plain_causal(stream, memory_anchor=memory_anchor):
            return PlainCausal()
        if impl not in ("structured", "flex"):
            return self.stream_mask(stream, stream, causal)  # (B, S, S)
        rule = {"memory_anchor": memory_anchor, "action_is_memory": self.config.action_is_memory}
        if impl == "flex" and not (self.training and self.config.dropout):
            return flex_blocks(stream, **rule)
        return stream_blocks(stream, **rule)

    def forward_stream(
        self, stream: TokenStream, causal: bool = False, attn_impl: AttnImpl | None = None
    ) -> torch.Tensor:
        """Hidden states (B, S, C) of a whole stream (no cache)."""
        mask = self.stream_attention_mask(stream, causal, attn_impl)
        hidden, _ = self(stream.tokens, stream.rotary_positions(self.config.rope), mask, None, attn_impl)
        return hidden

    def action_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., A); meaningful at anchor positions."""
        return self.action_head(hidden)

    def positive_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(positive action | anchor) from anchor hidden states (..., C) -> (...)."""
        return self.action_logits(hidden).float().softmax(-1)[..., self.config.positive_action]

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., V) next-token logits for PT."""
        return self.lm_head(hidden)
