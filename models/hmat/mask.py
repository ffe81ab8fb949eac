"""The MA-Attn mask (docs/method.md §3, §4; Hi-SAM §3.3.2, §3.4.2) as pure functions of token metadata.

Letters: B batch, S stream tokens, Sq query tokens, Sk key tokens, M memory tokens.

``attention_mask`` is the rule, as a dense (B, Sq, Sk) bool tensor (True: query may attend
key); ``allowed`` is the same rule elementwise. The rest keeps the mask as its structure,
so that attention never pays for the pairs the rule forbids:

- ``memory_tokens``: the tokens that later segments may attend. By the rule, a query may
  attend a memory key iff the key is not later in logical order, and any other key iff
  it lies in the query's own segment (history item or candidate block) and is not later.
  Every path below splits attention that way.
- ``StreamBlocks`` / ``stream_blocks``: a whole stream (full forward, training): chunks
  of queries, each against a prefix of the memory stream and a short window of the
  stream around itself (model attention, ``attn_impl="structured"``).
- ``memory_first`` / ``flex_mask_mod``: the keys reordered memory-first and the rule as a
  FlexAttention ``mask_mod`` over that order (``attn_impl="flex"``, CUDA).
- ``CachedBlocks``: candidates against an anchor cache (``inference.score_with_cache``).
"""

from __future__ import annotations

from collections.abc import Callable
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
    q = tuple(f[:, :, None] for f in _fields(query))  # (B, Sq, 1) each
    k = tuple(f[:, None, :] for f in _fields(key))  # (B, 1, Sk) each
    rule = allowed(*q, *k, memory_anchor=memory_anchor, action_is_memory=action_is_memory)  # (B, Sq, Sk)
    return rule | (q[0] == TokenType.PAD)


def _fields(stream: TokenStream) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The metadata the rule reads: (token_type, item, block, order)."""
    return stream.token_type, stream.item, stream.block, stream.order


def allowed(
    q_type: torch.Tensor,
    q_item: torch.Tensor,
    q_block: torch.Tensor,
    q_order: torch.Tensor,
    k_type: torch.Tensor,
    k_item: torch.Tensor,
    k_block: torch.Tensor,
    k_order: torch.Tensor,
    *,
    memory_anchor: bool,
    action_is_memory: bool,
) -> torch.Tensor:
    """``attention_mask``'s rule on broadcastable metadata tensors, without its padding-query clause.

    Elementwise comparisons only, so the same code serves the dense mask (broadcast
    (B, Sq, 1) against (B, 1, Sk)) and FlexAttention's vmapped ``mask_mod`` (scalars).
    """
    causal = k_order <= q_order
    k_candidate = (k_type == TokenType.CAND_SID) | (k_type == TokenType.CAND_ANCHOR)
    other_block = k_candidate & (k_block != q_block)
    rule = (k_type != TokenType.PAD) & causal & ~other_block
    if memory_anchor:
        same_segment = (k_item == q_item) & (k_block == q_block)
        memory = (k_type == TokenType.PROFILE) | (k_type == TokenType.ANCHOR)
        if action_is_memory:
            memory = memory | (k_type == TokenType.ACTION)
        rule = rule & (same_segment | memory)
    return rule


def memory_tokens(stream: TokenStream, *, memory_anchor: bool, action_is_memory: bool) -> torch.Tensor:
    """(B, S) bool, True: a token that tokens of later segments may attend (the stream's memory).

    MA-Attn: profile tokens, anchors, and actions when ``action_is_memory``; the plain
    causal rule: every history token (not padding, not a candidate). By ``allowed``, a
    query may attend a memory key iff the key is not later in logical order (a memory key
    is never a candidate, and is profile or memory), and a non-memory key iff the key is
    in the query's own segment and not later. The anchor cache keeps exactly these
    tokens (inference.py), and the structured paths below split attention along them.
    """
    t = stream.token_type
    if not memory_anchor:
        return (t != TokenType.PAD) & (t != TokenType.CAND_SID) & (t != TokenType.CAND_ANCHOR)
    keep = (t == TokenType.PROFILE) | (t == TokenType.ANCHOR)
    if action_is_memory:
        keep = keep | (t == TokenType.ACTION)
    return keep


def segment_reach(stream: TokenStream) -> int:
    """The largest distance, in stream positions, from a history or candidate token back to the
    first token of its segment (k + 1 for a ``build_stream`` stream): how far back a query's
    own non-memory keys can lie. Segments are runs of equal (item, block)."""
    B, S = stream.item.shape
    if S == 0:
        return 0
    pos = torch.arange(S, device=stream.item.device).expand(B, S)  # (B, S)
    starts = torch.ones_like(stream.item, dtype=torch.bool)  # (B, S) first token of a run
    starts[:, 1:] = (stream.item[:, 1:] != stream.item[:, :-1]) | (stream.block[:, 1:] != stream.block[:, :-1])
    reach = pos - torch.where(starts, pos, 0).cummax(1).values  # (B, S)
    t = stream.token_type
    counted = (t != TokenType.PAD) & (t != TokenType.PROFILE)  # the profile is all memory
    return int(torch.where(counted, reach, 0).max())


@dataclass(frozen=True)
class PlainCausal:
    """The mask of a stream without candidates under the plain causal rule (PT, the
    ``ma_attn=False`` ablation), right-padded, with ``order`` = position (``build_stream``):
    lower-triangular in position, which SDPA's ``is_causal`` kernels compute without a mask.
    Padding keys come after every real query, and padding rows are finite (their outputs
    are never read). ``plain_causal`` says when a stream qualifies."""


def plain_causal(stream: TokenStream, *, memory_anchor: bool) -> bool:
    """Whether ``attention_mask(stream, stream, memory_anchor=...)`` is ``PlainCausal`` on the real queries."""
    if memory_anchor:
        return False
    position = torch.arange(stream.order.shape[1], device=stream.order.device)  # (S,)
    valid = stream.valid  # (B, S)
    right_padded = valid == (position < valid.sum(1, keepdim=True))  # (B, S)
    in_place = (stream.order == position) | ~valid
    return bool(((stream.block < 0) & right_padded & in_place).all())


@dataclass(frozen=True)
class StreamChunk:
    """Queries ``[start, stop)`` of a stream against keys ``[key_start, key_stop)`` of ``StreamBlocks.key_index``.

    ``mask`` (B, 1, stop - start, key_stop - key_start) bool, True: may attend.
    """

    start: int
    stop: int
    key_start: int
    key_stop: int
    mask: torch.Tensor


@dataclass(frozen=True)
class StreamBlocks:
    """The mask of a whole stream (queries = keys = the stream) kept as its structure.

    By ``memory_tokens``, a query at stream position p may attend (1) memory keys with
    ``order`` <= its own, all earlier in the stream, and (2) non-memory keys of its own
    segment, which lie in ``[p - reach, p]`` (``segment_reach``). So the queries are cut
    into chunks of consecutive positions, and each chunk attends the memory tokens before
    its end (a prefix of the packed memory stream: the rest are later for every row) plus
    a window from ``reach`` before its start to its end, under the chunk's small dense
    mask. A memory slot the chunk's prefix holds for another row, or a window key of
    another segment, is masked out, and the window's memory tokens too (they are read
    through the prefix: each key is counted once). Under MA-Attn the memory stream is
    about 2 tokens per item of k + 2, so attention costs O(S (M / 2 + chunk)), not O(S^2).

    ``key_index`` (B, L): the stream position of every chunk's keys, chunk after chunk
    (memory prefix, then window), so that one gather per layer fetches them all. Padding
    queries may attend every key of their chunk (finite rows, outputs never read), as in
    ``attention_mask``.
    """

    key_index: torch.Tensor
    chunks: tuple[StreamChunk, ...]

    def key_counts(self, n_keys: int) -> torch.Tensor:
        """(B, S, n_keys) int: how many times each query reads each stream position (for checks).

        Equal to ``attention_mask`` (as 0/1) on real queries: every allowed key read once,
        no other key read."""
        B = self.key_index.shape[0]
        S = self.chunks[-1].stop if self.chunks else 0
        counts = torch.zeros(B, S, n_keys, dtype=torch.long, device=self.key_index.device)
        for c in self.chunks:
            index = self.key_index[:, None, c.key_start : c.key_stop].expand(B, c.stop - c.start, -1)  # (B, Sq, Sk)
            counts[:, c.start : c.stop].scatter_add_(2, index, c.mask[:, 0].long())
        return counts


def stream_blocks(stream: TokenStream, *, memory_anchor: bool, action_is_memory: bool, chunk: int = 64) -> StreamBlocks:
    """``StreamBlocks`` of ``stream`` under the rule of ``attention_mask(stream, stream, ...)``.

    ``chunk``: queries per chunk. Smaller chunks read less of the window and of the memory
    stream past each query, at more kernel calls per layer; 64 to 128 were fastest on CPU
    at the CPU preset (``hisam bench ranker``).
    """
    mem = memory_tokens(stream, memory_anchor=memory_anchor, action_is_memory=action_is_memory)  # (B, S)
    B, S = mem.shape
    before = mem.cumsum(1)  # (B, S): memory tokens at positions <= s
    stops = [*range(chunk, S, chunk), S] if S else []
    # One host read for every size the plan needs: each chunk's memory prefix (the last is M).
    sizes = before[:, [s - 1 for s in stops]].amax(0).tolist() if stops else []
    M = sizes[-1] if sizes else 0
    memory_index = torch.argsort((~mem).to(torch.int8), dim=1, stable=True)[:, :M]  # (B, M) memory first, in order
    slot_valid = torch.arange(M, device=mem.device)[None, :] < mem.sum(1, keepdim=True)  # (B, M)
    memory = stream.gather(memory_index, slot_valid)  # (B, M); padding slots become padding tokens
    position = torch.arange(S, device=mem.device).expand(B, S)  # (B, S)
    reach = segment_reach(stream)
    chunks, key_index, key_start = [], [], 0
    for start, stop, n_memory in zip([0, *stops[:-1]], stops, sizes, strict=True):
        window = max(0, start - reach)
        query = stream.span(start, stop)
        keys = memory.span(0, n_memory).cat(stream.span(window, stop))
        mask = attention_mask(query, keys, memory_anchor=memory_anchor, action_is_memory=action_is_memory)
        padding_query = (query.token_type == TokenType.PAD)[:, :, None]  # (B, Sq, 1)
        mask[..., n_memory:] &= ~mem[:, None, window:stop] | padding_query  # (B, Sq, n_memory + stop - window)
        key_index += [memory_index[:, :n_memory], position[:, window:stop]]
        key_stop = key_start + n_memory + stop - window
        chunks.append(StreamChunk(start, stop, key_start, key_stop, mask[:, None]))
        key_start = key_stop
    index = torch.cat(key_index, 1) if key_index else position[:, :0]  # (B, L)
    return StreamBlocks(index, tuple(chunks))


def memory_first(stream: TokenStream, *, memory_anchor: bool, action_is_memory: bool) -> torch.Tensor:
    """(B, S) permutation of stream positions: the memory tokens, then the others, each in stream order.

    FlexAttention skips key tiles its ``BlockMask`` finds empty. In stream order the
    memory tokens are spread over every tile (2 in k + 2), so under MA-Attn almost every
    tile below the diagonal holds a visible key; in this order the memory keys form a
    causal band and the other keys a narrow band along each query tile's own segments,
    so most tiles are empty."""
    mem = memory_tokens(stream, memory_anchor=memory_anchor, action_is_memory=action_is_memory)
    return torch.argsort((~mem).to(torch.int8), dim=1, stable=True)


def flex_mask_mod(
    stream: TokenStream, key_index: torch.Tensor, *, memory_anchor: bool, action_is_memory: bool
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlexAttention ``mask_mod(b, h, q, kv)``: may query position q attend key kv of the keys
    reordered by ``key_index`` (B, S) (``memory_first``)? True: may attend.

    ``allowed`` on the real queries; a padding query attends the padding keys only (at
    least itself, since keys are a permutation of the stream: a finite row that keeps
    padding tiles out of the real ones' way; its output is never read).
    """
    q_fields = _fields(stream)
    k_fields = tuple(f.gather(1, key_index) for f in q_fields)  # (B, S) each, in key order
    pad = TokenType.PAD

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        qf = tuple(f[b, q] for f in q_fields)
        kf = tuple(f[b, kv] for f in k_fields)
        rule = allowed(*qf, *kf, memory_anchor=memory_anchor, action_is_memory=action_is_memory)
        return torch.where(qf[0] == pad, kf[0] == pad, rule)

    return mask_mod


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
