"""Ranking with HMAT: one-pass parallel ranking and the anchor KV cache (docs/method.md §4; Hi-SAM §3.4.2).

Letters: B users, S stream tokens, M cached slots, N candidates, k semantic IDs per item,
G key/value heads, D head dim, C hidden width, P profile tokens, T history items.

One-pass ranking (``rank_candidates``): the N candidates of a user are appended to the
stream as ``[c_1 .. c_k, ANCHOR_c]`` blocks, all at inter-item coordinate i = T + 1, and
the block-diagonal mask keeps them apart, so one forward pass scores them all and a
candidate's score does not depend on its neighbours or its place in the batch.

Anchor KV cache (``encode_history``, ``score_with_cache``, ``append_history``).

*Why it is exact.* Under MA-Attn a token's hidden state at layer l is a function of the
layer l-1 states of the tokens it may attend. Every token that comes after a user's
history (a candidate, or a later history item) may attend only profile tokens, memory
tokens of earlier items (anchor, and action when ``action_is_memory``) and tokens of its
own segment. So, at every layer, the keys and values of an earlier item's raw semantic
IDs are never read again: evicting them changes nothing. The keys and values that are
kept are final once computed, because attention is causal and nothing later feeds back
into them. The cached result therefore equals the full forward pass, up to floating-point
summation order (tested to 1e-5 in fp32). Under the ``ma_attn=False`` ablation every
history token stays visible, so nothing is evicted and this is an ordinary KV cache.

*Size.* A user's cache holds P + 2T slots (P + T without action memory) instead of
P + (k + 2) T: a factor of about (k + 2) / 2 = 4 at k = 6, and candidate attention over
history costs O(T) per candidate token instead of O(kT).

*Position map.* Keys are stored already rotated at their own logical coordinates; a
rotation depends only on the token's own (i, j), never on its neighbours, so physical
eviction leaves them valid. ``AnchorKVCache.slots`` is a ``TokenStream`` saying, for each
physical slot, which logical token it holds (type, item, order, i, j, flat position): the
mask reads type, item and order from it to decide what a new query may see, and
``n_items`` / ``next_order`` say where the logical stream ended, so new tokens continue
the coordinates exactly where a full re-encoding would put them (sequence.continue_stream).
Slots of different users are right-padded; appends concatenate after the padding, which
the mask ignores because causality uses logical order, not physical slot.

All functions run under ``torch.no_grad``; call ``model.eval()`` first so dropout is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.hmat.mask import CachedBlocks, memory_tokens
from models.hmat.model import HMAT, AttnImpl, HMATConfig, LayerKV
from models.hmat.sequence import TokenStream, TokenType, candidate_stream, continue_stream


@dataclass
class AnchorKVCache:
    """Per-layer keys/values of the profile and memory tokens of a batch of user histories."""

    keys: list[torch.Tensor]  # per layer (B, G, M, D), rotated at the slot's logical coordinates
    values: list[torch.Tensor]  # per layer (B, G, M, D)
    slots: TokenStream  # (B, M) logical position map: which token each physical slot holds
    n_items: torch.Tensor  # (B,) history items encoded so far; the next item is n_items + 1
    next_order: torch.Tensor  # (B,) logical length of the encoded stream = next order / flat position

    @property
    def n_slots(self) -> int:
        return self.slots.tokens.shape[1]


def _kept(stream: TokenStream, config: HMATConfig) -> torch.Tensor:
    """(B, S) tokens a later token may ever attend (``mask.memory_tokens``): profile + memory,
    or every history token under the causal ablation (a history stream holds no candidates)."""
    return memory_tokens(stream, memory_anchor=config.ma_attn, action_is_memory=config.action_is_memory)


def _compact(
    stream: TokenStream, present: list[LayerKV], keep: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], TokenStream]:
    """Keep only the ``keep`` (B, S) slots, packed to the left and right-padded to M."""
    count = keep.sum(1)  # (B,)
    M = int(count.max()) if count.numel() else 0
    index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :M]  # (B, M) kept slots first, in order
    valid = torch.arange(M, device=keep.device)[None, :] < count[:, None]  # (B, M)
    keys, values = [], []
    for k, v in present:
        B, G, _, D = k.shape
        idx = index[:, None, :, None].expand(B, G, M, D)
        fill = valid[:, None, :, None]
        keys.append(torch.where(fill, k.gather(2, idx), 0.0))  # (B, G, M, D)
        values.append(torch.where(fill, v.gather(2, idx), 0.0))
    return keys, values, stream.gather(index, valid)


def _run_after_cache(
    model: HMAT, cache: AnchorKVCache, new: TokenStream, attn_impl: AttnImpl | None, block: int = 0
) -> tuple[torch.Tensor, list[LayerKV]]:
    """Run ``new`` tokens attending the cache's slots and themselves.

    ``block`` > 0: ``new`` is whole candidate blocks of that many tokens, and the mask is
    passed as its ``CachedBlocks`` structure (the fast path, or ``hisam::cached_block_attention``
    under "custom_op"); 0: the dense mask.
    """
    if block:
        mask: torch.Tensor | CachedBlocks = CachedBlocks(cache.slots.valid, block)
    else:
        mask = model.stream_mask(new, cache.slots.cat(new))  # (B, S, M + S)
    positions = new.rotary_positions(model.config.rope)  # (B, S, 2)
    return model(new.tokens, positions, mask, list(zip(cache.keys, cache.values, strict=True)), attn_impl)


@torch.no_grad()
def rank_candidates(model: HMAT, stream: TokenStream, attn_impl: AttnImpl | None = None) -> torch.Tensor:
    """One-pass parallel ranking: P(positive) for every candidate of every user, (B, N).

    N is the largest candidate count in the batch; users with fewer get NaN in the unused
    columns (never a valid probability, so misuse is loud).
    """
    hidden = model.forward_stream(stream, attn_impl=attn_impl)  # (B, S, C)
    b, s = (stream.token_type == TokenType.CAND_ANCHOR).nonzero(as_tuple=True)
    n_max = int(stream.n_candidates.max()) if b.numel() else 0
    scores = torch.full((stream.tokens.shape[0], n_max), float("nan"), device=hidden.device)  # (B, N)
    scores[b, stream.block[b, s]] = model.positive_prob(hidden[b, s])
    return scores


@torch.no_grad()
def encode_history(model: HMAT, stream: TokenStream, attn_impl: AttnImpl | None = None) -> AnchorKVCache:
    """Encode profile + history once and keep only what later tokens can attend.

    ``stream`` comes from ``build_stream`` with no candidates (an empty history is fine:
    the cache then holds the profile only).
    """
    if bool((stream.block >= 0).any()):
        raise ValueError("encode_history takes a stream without candidates; score them with score_with_cache")
    mask = model.stream_attention_mask(stream, attn_impl=attn_impl)
    _, present = model(stream.tokens, stream.rotary_positions(model.config.rope), mask, None, attn_impl)
    keys, values, slots = _compact(stream, present, _kept(stream, model.config))
    return AnchorKVCache(keys, values, slots, stream.n_items, stream.lengths)


@torch.no_grad()
def score_with_cache(
    model: HMAT, cache: AnchorKVCache, candidates: torch.Tensor, attn_impl: AttnImpl | None = None
) -> torch.Tensor:
    """P(positive) (B, N) for ``candidates`` (B, N, k) semantic-ID codes, against the cache.

    Candidates attend the cached slots and their own block only, with i = n_items + 1, so
    the result equals ``rank_candidates`` on the full stream. The attention runs
    block-structured (``mask.CachedBlocks``: the dense mask is never built), through the
    custom op under "custom_op"; naming "reference" or "sdpa" runs it under the dense mask
    with that kernel instead (the checks of the fast path).
    """
    B, N, k = candidates.shape
    layout = model.config.layout
    if k != layout.n_sid:
        raise ValueError(f"candidates have {k} codes each, the model reads {layout.n_sid}")
    bad = ((candidates < 0) | (candidates >= layout.codebook_size)).flatten(1).any(1)  # (B,)
    if bool(bad.any()):
        raise ValueError(f"user {int(bad.nonzero()[0])}: candidate codes must lie in [0, {layout.codebook_size})")
    new = candidate_stream(layout, cache.n_items, cache.next_order, candidates.to(cache.n_items.device))
    block = 0 if attn_impl in ("reference", "sdpa") else k + 1
    hidden, _ = _run_after_cache(model, cache, new, attn_impl, block)  # (B, N * (k + 1), C)
    anchors = hidden[new.token_type == TokenType.CAND_ANCHOR].view(B, N, -1)  # (B, N, C), blocks in order
    return model.positive_prob(anchors)


@torch.no_grad()
def append_history(
    model: HMAT,
    cache: AnchorKVCache,
    sids: torch.Tensor,
    actions: torch.Tensor,
    attn_impl: AttnImpl | None = None,
) -> AnchorKVCache:
    """Add new history items (B, T_new, k) with their actions (B, T_new) without re-encoding.

    The new items' tokens attend the cache (and each other under the mask); only their
    memory tokens' keys/values are kept. Raises ``ValueError`` when a user would pass
    ``max_items``: dropping the oldest item would change every later item's state, so the
    caller must re-encode the most recent ``max_items`` items instead.
    """
    T_new, limit = sids.shape[1], model.config.max_items
    if bool((cache.n_items + T_new > limit).any()):
        raise ValueError(
            f"appending {T_new} item(s) would pass max_items={limit}; re-encode the most recent items instead"
        )
    new = continue_stream(model.config.layout, cache.n_items, cache.next_order, sids=sids, actions=actions)
    _, present = _run_after_cache(model, cache, new, attn_impl)
    keys, values, slots = _compact(new, present, _kept(new, model.config))
    return AnchorKVCache(
        keys=[torch.cat([old, k], dim=2) for old, k in zip(cache.keys, keys, strict=True)],  # (B, G, M + M_new, D)
        values=[torch.cat([old, v], dim=2) for old, v in zip(cache.values, values, strict=True)],
        slots=cache.slots.cat(slots),
        n_items=cache.n_items + T_new,
        next_order=cache.next_order + new.lengths,
    )
