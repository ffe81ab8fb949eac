"""The MA-Attn mask (docs/method.md §3, §4; Hi-SAM §3.3.2, §3.4.2) as one pure function.

Letters: B batch, Sq query tokens, Sk key tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.hmat.sequence import TokenStream, TokenType


def attention_mask(
    query: TokenStream, key: TokenStream, *, memory_anchor: bool, action_is_memory: bool
) -> torch.Tensor:
    """Which keys each query may attend: (B, Sq, Sk) bool, True: query q may attend key k.

    A function of token metadata only (type, item, candidate block, logical order), so the
    same function serves the full stream (``query`` and ``key`` the same stream) and a
    cache (``key`` = cached slots followed by the new tokens, ``query`` = the new tokens).

    Always (both modes):
    - causal in logical order: ``key.order <= query.order``;
    - padding keys are never visible;
    - candidates are block-diagonal: a candidate token is visible only to tokens of its own
      block, so no candidate sees another (docs/method.md §4, one-pass ranking).

    ``memory_anchor=True`` (MA-Attn, docs/method.md §3) additionally allows only:
    (1) profile tokens; (2) tokens of the query's own segment (same history item, or same
    candidate block); (3) memory tokens of history items: the anchor, and the action if
    ``action_is_memory`` (our reading of the open question, docs/method.md §3). Raw semantic-ID
    tokens of other items are never visible. ``memory_anchor=False`` is the plain causal
    mask used by PT and by the ``ma_attn=False`` ablation.

    Padding queries may attend every key: their softmax row is then finite (a fully masked
    row is NaN, and NaN values would leak through 0 * NaN in later layers); their outputs
    are never read.

    Example, MA-Attn with action_is_memory: profile u, two history items with 2 semantic
    IDs each (s, anchor A, action R), two candidates (c, anchor C). Rows are queries::

                u s s A R s s A R c c C c c C
        u       1 . . . . . . . . . . . . . .
        s11     1 1 . . . . . . . . . . . . .
        s12     1 1 1 . . . . . . . . . . . .
        A1      1 1 1 1 . . . . . . . . . . .
        R1      1 1 1 1 1 . . . . . . . . . .
        s21     1 . . 1 1 1 . . . . . . . . .
        s22     1 . . 1 1 1 1 . . . . . . . .
        A2      1 . . 1 1 1 1 1 . . . . . . .
        R2      1 . . 1 1 1 1 1 1 . . . . . .
        c11     1 . . 1 1 . . 1 1 1 . . . . .
        c12     1 . . 1 1 . . 1 1 1 1 . . . .
        C1      1 . . 1 1 . . 1 1 1 1 1 . . .
        c21     1 . . 1 1 . . 1 1 . . . 1 . .
        c22     1 . . 1 1 . . 1 1 . . . 1 1 .
        C2      1 . . 1 1 . . 1 1 . . . 1 1 1

    With ``action_is_memory=False`` the R columns are 0 outside their own item.
    """
    q_type = query.token_type[:, :, None]  # (B, Sq, 1)
    k_type = key.token_type[:, None, :]  # (B, 1, Sk)
    causal = key.order[:, None, :] <= query.order[:, :, None]  # (B, Sq, Sk)
    k_candidate = (k_type == TokenType.CAND_SID) | (k_type == TokenType.CAND_ANCHOR)
    other_block = k_candidate & (key.block[:, None, :] != query.block[:, :, None])
    allowed = (k_type != TokenType.PAD) & causal & ~other_block
    if memory_anchor:
        same_segment = (key.item[:, None, :] == query.item[:, :, None]) & (
            key.block[:, None, :] == query.block[:, :, None]
        )
        memory = k_type == TokenType.ANCHOR
        if action_is_memory:
            memory = memory | (k_type == TokenType.ACTION)
        allowed = allowed & ((k_type == TokenType.PROFILE) | same_segment | memory)
    return allowed | (q_type == TokenType.PAD)


@dataclass(frozen=True)
class CachedBlocks:
    """The mask of candidates scored against an anchor cache, kept as its structure.

    In ``score_with_cache`` every query is a candidate token and the keys are the cached
    slots followed by the candidate tokens. By ``attention_mask`` a candidate token may see
    every valid cached slot (profile and memory tokens only are kept, all earlier in
    logical order; under the causal ablation the cache holds every history token, all
    earlier too) and the earlier tokens of its own block, nothing else. So the (Sq, M + Sq)
    dense mask is all ones over the valid slots, and block-diagonal lower-triangular over
    the new tokens: attention splits into a dense part over the M slots and N independent
    ``block`` x ``block`` parts, O(Sq (M + block)) instead of O(Sq (M + Sq)). Tested equal
    to the dense mask (tests/models/test_hmat_inference.py).

    ``slot_valid`` (B, M): True where the slot holds a token (False: padding).
    ``block``: tokens per candidate block (k + 1), the new tokens being N whole blocks.
    """

    slot_valid: torch.Tensor
    block: int

    def dense(self, n_new: int) -> torch.Tensor:
        """The same mask as a (B, n_new, M + n_new) bool tensor (for checks and the fallback)."""
        B, M = self.slot_valid.shape
        idx = torch.arange(n_new, device=self.slot_valid.device)
        own = (idx[None, :] // self.block == idx[:, None] // self.block) & (idx[None, :] <= idx[:, None])
        return torch.cat([self.slot_valid[:, None, :].expand(B, n_new, M), own[None].expand(B, n_new, n_new)], -1)
