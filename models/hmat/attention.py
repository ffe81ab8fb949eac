"""Attention that reads the MA-Attn mask as its structure, not as a dense mask (docs/method.md §3-§4).

Letters: B batch, S stream tokens, H query heads, G key/value heads (GQA, H = G * R), D head
dim, M memory or cached slots, N candidate blocks of b tokens each.

Every function here computes ``model.reference_attention`` under the dense mask that
``mask.attention_mask`` gives for the same tokens (tested to 1e-5 in fp32, forward and
gradients, tests/models/test_hmat_attention.py); they differ in which pairs they never
compute:

- ``structured_attention`` (``attn_impl="structured"``; the CPU path): a whole stream under
  ``mask.StreamBlocks``, one fused SDPA call per chunk of queries over [memory prefix,
  local window]. Pure PyTorch, any device, dropout and autograd as SDPA's.
- ``causal_attention``: a stream under ``mask.PlainCausal`` (PT; the causal ablation
  without candidates): SDPA's ``is_causal`` kernels, no mask at all.
- ``flex_blocks`` / ``flex_attention_blocks`` (``attn_impl="flex"``; CUDA): the same rule
  as a FlexAttention ``BlockMask`` over memory-first keys, ``torch.compile``d.
- ``cached_block_attention``: candidates against an anchor cache (``mask.CachedBlocks``;
  inference.score_with_cache, and the eager kernel of ``hisam::cached_block_attention``).

Why one SDPA call per chunk, and not a memory part and per-item blocks merged through their
log-sum-exps: PyTorch's fused SDPA kernels return no differentiable log-sum-exp, and an
unfused merge writes and reads the (B, H, S, M) fp32 scores several times in forward and
backward (2.5x slower than the chunked fused calls at the CPU preset, T = 300). The chunk's
window costs about ``chunk`` extra keys per query, under the memory prefix's M / 2.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from models.hmat.mask import CachedBlocks, StreamBlocks, flex_mask_mod, memory_first
from models.hmat.sequence import TokenStream

LayerKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B, G, S, D) each, keys rotated


def structured_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: StreamBlocks, dropout_p: float
) -> torch.Tensor:
    """Attention of a stream over itself under ``blocks``; q (B, H, S, D), k/v (B, G, S, D) -> (B, H, S, D).

    One gather per layer fetches every chunk's keys/values (``StreamBlocks.key_index``) and
    splits hand them out, so the backward adds each part's gradient once (chunk-wise slices
    would each allocate and add a full-size zero gradient). Each chunk is one SDPA call,
    GQA inside the kernel (``enable_gqa``: no copies of K/V per query head).
    """
    B, G, _, D = k.shape
    L = blocks.key_index.shape[1]
    index = blocks.key_index[:, None, :, None].expand(B, G, L, D)
    k_all, v_all = k.gather(2, index), v.gather(2, index)  # (B, G, L, D): the chunks' keys, chunk after chunk
    key_sizes = [c.key_stop - c.key_start for c in blocks.chunks]
    query_sizes = [c.stop - c.start for c in blocks.chunks]
    out = [
        F.scaled_dot_product_attention(q_c, k_c, v_c, attn_mask=c.mask, dropout_p=dropout_p, enable_gqa=True)
        for c, q_c, k_c, v_c in zip(
            blocks.chunks,
            q.split(query_sizes, dim=2),  # (B, H, Sq_c, D) each
            k_all.split(key_sizes, dim=2),  # (B, G, Sk_c, D) each
            v_all.split(key_sizes, dim=2),
            strict=True,
        )
    ]
    return torch.cat(out, dim=2) if out else torch.zeros_like(q)  # (B, H, S, D)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """``mask.PlainCausal``: q (B, H, S, D), k/v (B, G, S, D) -> (B, H, S, D) through ``is_causal``."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=True)


# --- FlexAttention (CUDA) ------------------------------------------------------------------------


def flex_available(device: torch.device) -> bool:
    """FlexAttention needs its Triton kernels: CUDA, and a torch that ships the module."""
    return device.type == "cuda" and _flex_module() is not None


@functools.cache
def _flex_module() -> Any:
    try:
        from torch.nn.attention import flex_attention
    except ImportError:
        return None
    return flex_attention


@functools.cache
def _compiled_flex() -> Any:
    """Compiled once per process; eager flex_attention materialises the scores (its fallback)."""
    return torch.compile(_flex_module().flex_attention)


@dataclass(frozen=True)
class FlexBlocks:
    """A stream's mask as FlexAttention reads it: keys reordered by ``key_index`` (B, S)
    (``mask.memory_first``) and the ``BlockMask`` of ``mask.flex_mask_mod`` over that order."""

    key_index: torch.Tensor
    block_mask: Any


def flex_blocks(stream: TokenStream, *, memory_anchor: bool, action_is_memory: bool) -> FlexBlocks:
    """Build ``FlexBlocks`` for ``stream`` on its device (once per forward, shared by the layers)."""
    key_index = memory_first(stream, memory_anchor=memory_anchor, action_is_memory=action_is_memory)  # (B, S)
    mask_mod = flex_mask_mod(stream, key_index, memory_anchor=memory_anchor, action_is_memory=action_is_memory)
    B, S = key_index.shape
    block_mask = _flex_module().create_block_mask(mask_mod, B, None, S, S, device=key_index.device, _compile=True)
    return FlexBlocks(key_index, block_mask)


def flex_attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: FlexBlocks) -> torch.Tensor:
    """Attention of a stream over itself under ``blocks``; q (B, H, S, D), k/v (B, G, S, D) -> (B, H, S, D)."""
    B, G, S, D = k.shape
    index = blocks.key_index[:, None, :, None].expand(B, G, S, D)
    k_perm, v_perm = k.gather(2, index), v.gather(2, index)  # (B, G, S, D), memory keys first
    return _compiled_flex()(q, k_perm, v_perm, block_mask=blocks.block_mask, enable_gqa=True)


# --- Candidates against an anchor cache ----------------------------------------------------------


def cached_block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: LayerKV, blocks: CachedBlocks, group: int = 16
) -> torch.Tensor:
    """Attention under a ``CachedBlocks`` mask without building its (B, S, M + S) dense form.

    q (B, H, S, D) with S = N * block new tokens; k/v (B, G, S, D) their keys/values;
    ``past`` (B, G, M, D) cached keys/values. The candidates go in groups of ``group``
    whole blocks: one SDPA call per group over [the M slots, the group's own tokens] under
    a (group * block, M + group * block) mask (valid slots; lower-triangular inside each
    block), so each query's logits over the slots and over its own block share one
    softmax, and the work is O(S (M + group * block)) instead of O(S (M + S)). The result
    is ``reference_attention`` under ``blocks.dense(S)``; GQA inside the kernel.
    (A fused call per group beat an explicit fp32 two-part softmax by about 25% at the CPU
    preset, M = 602 slots and 100 candidates.)
    """
    B, S = q.shape[0], q.shape[2]
    M, b = past[0].shape[2], blocks.block
    n = min(S, group * b)  # queries per call: whole blocks
    idx = torch.arange(n, device=q.device)
    own = (idx[None, :] // b == idx[:, None] // b) & (idx[None, :] <= idx[:, None])  # (n, n)
    mask = torch.cat(
        [blocks.slot_valid[:, None, None, :].expand(B, 1, n, M), own.expand(B, 1, n, n)], dim=-1
    )  # (B, 1, n, M + n)
    out = []
    for start in range(0, S, n):
        m = min(n, S - start)  # the last group may hold fewer blocks
        k_g = torch.cat([past[0], k[:, :, start : start + m]], dim=2)  # (B, G, M + m, D)
        v_g = torch.cat([past[1], v[:, :, start : start + m]], dim=2)  # (B, G, M + m, D)
        q_g = q[:, :, start : start + m]  # (B, H, m, D)
        out.append(F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=mask[..., :m, : M + m], enable_gqa=True))
    return torch.cat(out, dim=2) if out else torch.zeros_like(q)  # (B, H, S, D)
