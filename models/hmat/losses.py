"""HMAT training objectives (docs/method.md §3 "Losses"; Hi-SAM §3.4.1).

Letters: B batch, S stream tokens, C hidden width, A action types, V vocabulary.

- SFT: negative log-likelihood of each history action, predicted from the hidden state of
  the anchor just before it, under the MA-Attn mask (or the plain causal mask for the
  ``ma_attn=False`` ablation). This is the ranking objective: at serving time the score
  is the same head read at a candidate's anchor.
- PT: next-token cross-entropy over the whole stream (profile, semantic IDs, anchors,
  actions) with a plain causal mask: the paper pre-trains with the memory-anchor mask
  disabled so that the model learns how semantic IDs co-occur from the full context.

Both are means over their targets in the batch; streams must hold no candidates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.hmat.model import HMAT, AttnImpl
from models.hmat.sequence import TokenStream, TokenType


def _require_history_only(stream: TokenStream) -> None:
    if bool((stream.block >= 0).any()):
        raise ValueError("training streams hold history only; candidates have no labels")


def sft_loss(model: HMAT, stream: TokenStream, attn_impl: AttnImpl | None = None) -> torch.Tensor:
    """Mean NLL of the action after every anchor; NaN-free (0 with grad) when there is no anchor."""
    _require_history_only(stream)
    hidden = model.forward_stream(stream, attn_impl=attn_impl)  # (B, S, C)
    b, s = (stream.token_type == TokenType.ANCHOR).nonzero(as_tuple=True)
    if b.numel() == 0:
        return hidden.sum() * 0.0
    # sequence.py puts each item's action token right after its anchor.
    target = stream.tokens[b, s + 1] - model.config.layout.action_offset  # (n_anchors,)
    logits = model.action_logits(hidden[b, s])  # (n_anchors, A)
    return F.cross_entropy(logits.float(), target)


def pt_loss(model: HMAT, stream: TokenStream, attn_impl: AttnImpl | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over every real token after the first, causal mask."""
    _require_history_only(stream)
    hidden = model.forward_stream(stream, causal=True, attn_impl=attn_impl)  # (B, S, C)
    logits = model.lm_logits(hidden[:, :-1])  # (B, S - 1, V)
    target = stream.tokens[:, 1:].masked_fill(~stream.valid[:, 1:], -100)  # (B, S - 1)
    if not bool((target != -100).any()):
        return hidden.sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
