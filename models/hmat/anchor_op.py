"""Memory-anchor attention as named PyTorch operators: ``hisam::anchor_attention`` and
``hisam::cached_block_attention`` (docs/method.md §3-§4).

Letters: B batch, S query tokens, Sk keys (cached slots + S), H query heads, G key/value
heads (GQA, H = G * R), D head dim.

Contract: q (B, H, S, D); k, v (B, G, Sk, D), keys already rotated; mask (B, S, Sk) bool,
True: query s may attend key k (``mask.attention_mask``); returns softmax(q k^T / sqrt(D),
masked) v, (B, H, S, D), in q's dtype. The mask must leave every row at least one key
(``attention_mask`` guarantees this: padding queries attend everything), or that row is NaN.

Registered with ``torch.library.custom_op``: the eager kernel is the model's SDPA path, the
fake kernel gives ``torch.export`` the output shape (that of ``q``). ``attn_impl="custom_op"``
(model.py) dispatches attention here, which is the path ONNX export takes so that attention
becomes one custom-domain node; the op's ONNX node and function live in
``export/anchor_attention.py``. This module imports nothing of ONNX.

Why the mask is an input and GQA is inside:
- The mask depends on token metadata only, not on the layer, so it is built once per
  forward (mask.py, the tested pure function) and shared by all layers; building it
  inside the op would rebuild it per layer, and would tie the op to the stream's
  metadata encoding. A fused kernel that wants to skip masked tiles can still do so:
  its tile-skipping reads the same mask.
- GQA inside: the op sees the G key/value heads as they are cached, so neither the
  anchor cache nor the graph ever materialises R copies of them outside the op. Head h
  of q uses key head h // R, as ``model.repeat_kv``.

``hisam::cached_block_attention`` is candidate scoring against an anchor cache with the mask
kept as its structure (``mask.CachedBlocks``): q (B, H, S, D) with S = N * ``block`` new
tokens (N whole candidate blocks), k, v (B, G, S, D) their keys/values, k_past, v_past
(B, G, M, D) the cached slots, slot_valid (B, M) bool (False: padding slot), ``block`` an
int. Each candidate token attends every valid slot and the earlier tokens of its own block,
in one softmax. Eager kernel: ``attention.cached_block_attention``. It exists so that the
exported cache-scoring graph builds no (B, S, M + S) mask and scores O(S (M + block)) pairs
instead of O(S (M + S)) (export/anchor_attention.py holds its ONNX function).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.hmat.attention import cached_block_attention
from models.hmat.mask import CachedBlocks


@torch.library.custom_op("hisam::anchor_attention", mutates_args=())
def anchor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), mask) v with GQA; shapes in the module docstring."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # (B, H, Sk, D), as model.repeat_kv
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])


@anchor_attention.register_fake
def _anchor_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of key/value heads (GQA)")
    return torch.empty_like(q)


@torch.library.custom_op("hisam::cached_block_attention", mutates_args=())
def cached_block_anchor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_past: torch.Tensor,
    v_past: torch.Tensor,
    slot_valid: torch.Tensor,
    block: int,
) -> torch.Tensor:
    """Candidates against cached slots under ``CachedBlocks(slot_valid, block)``; shapes in the module docstring."""
    return cached_block_attention(q, k, v, (k_past, v_past), CachedBlocks(slot_valid, block))


@cached_block_anchor_attention.register_fake
def _cached_block_anchor_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_past: torch.Tensor,
    v_past: torch.Tensor,
    slot_valid: torch.Tensor,
    block: int,
) -> torch.Tensor:
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of key/value heads (GQA)")
    return torch.empty_like(q)
