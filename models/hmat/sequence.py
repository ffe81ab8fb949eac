"""The HMAT token stream: vocabulary layout, (i, j) coordinates and per-token metadata.

Letters: B users in a batch, S tokens in a (padded) stream, T history items of one user,
N candidates, P profile tokens, k = n_sid semantic IDs per item. (T names items here, as
in docs/method.md, so tokens get S.)

One user's stream (docs/method.md §3, §4)::

    u_1 .. u_P | s_11 .. s_1k ANCHOR_1 ACTION_1 | ... | s_T1 .. s_Tk ANCHOR_T ACTION_T |
    c_11 .. c_1k ANCHOR_c1 | ... | c_N1 .. c_Nk ANCHOR_cN

Every token carries, besides its vocabulary id:

- ``token_type``: a ``TokenType`` (profile / sid / anchor / action / candidate-sid /
  candidate-anchor, or padding);
- ``item``: 0 for profile tokens, t (1-based) for history item t, T + 1 for every
  candidate, -1 for padding;
- ``block``: the candidate's index 0..N-1 for candidate tokens, -1 otherwise;
- ``order``: the token's index in the user's unpadded stream (causality only; the
  candidates keep their concatenated order, the block-diagonal mask makes it irrelevant);
- ``pos_i``, ``pos_j``: H-RoPE coordinates. Profile: i = 0, j = 0..P-1. Item t: i = t,
  j = 0..k+1 through its semantic IDs, anchor and action. Every candidate: i = T + 1,
  j = 0..k (input-side position re-alignment, docs/method.md §4);
- ``pos_flat``: the 1-D RoPE position for the ``rope1d`` ablation: ``order`` for profile
  and history, and (number of tokens before the first candidate) + j for candidates, so
  the flat variant is re-aligned the same way.

Vocabulary (``StreamLayout``): ``[PAD, ANCHOR, ACTION_0 .. ACTION_{A-1}, profile ids,
codebook 0 codes, codebook 1 codes, ...]``; codebook c's code x has id
``sid_offset + c * K + x``, so codebooks never share an id.

History longer than ``max_items`` keeps the most recent ``max_items`` items (older ones
are dropped and the kept ones renumbered from 1): the model was trained with at most
that many, and the rotary tables end there. Profiles longer than ``max_profile_len``
raise instead, since there is no natural part of a profile to drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Literal

import torch


class TokenType(IntEnum):
    """Role of a token in the stream; the mask (mask.py) is a function of these."""

    PAD = 0
    PROFILE = 1
    SID = 2
    ANCHOR = 3
    ACTION = 4
    CAND_SID = 5
    CAND_ANCHOR = 6


@dataclass(frozen=True)
class StreamLayout:
    """Vocabulary layout and stream limits; ``HMATConfig.layout`` builds it."""

    n_sid: int = 6
    codebook_size: int = 256
    profile_vocab_size: int = 1024
    n_actions: int = 2
    max_items: int = 300
    max_profile_len: int = 32

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def anchor_id(self) -> int:
        return 1

    @property
    def action_offset(self) -> int:
        return 2

    @property
    def profile_offset(self) -> int:
        return self.action_offset + self.n_actions

    @property
    def sid_offset(self) -> int:
        return self.profile_offset + self.profile_vocab_size

    @property
    def vocab_size(self) -> int:
        return self.sid_offset + self.n_sid * self.codebook_size

    @property
    def item_len(self) -> int:
        """Tokens per history item: k semantic IDs, the anchor, the action."""
        return self.n_sid + 2

    @property
    def max_i(self) -> int:
        """Largest inter-item coordinate: candidates of a full history sit at T + 1."""
        return self.max_items + 1

    @property
    def max_j(self) -> int:
        return max(self.max_profile_len, self.item_len) - 1

    @property
    def max_flat(self) -> int:
        return self.max_profile_len + self.max_items * self.item_len + self.n_sid

    def sid_token(self, codebook: int, code: int) -> int:
        return self.sid_offset + codebook * self.codebook_size + code

    def action_token(self, action: int) -> int:
        return self.action_offset + action


@dataclass
class UserSequence:
    """One user's raw input: codes and actions before they become vocabulary ids.

    ``profile``: P ids in [0, profile_vocab_size). ``sids``: T rows of n_sid codes, each in
    [0, codebook_size), oldest first. ``actions``: T action types in [0, n_actions).
    ``candidates``: N rows of n_sid codes to be scored.
    """

    profile: Sequence[int] = ()
    sids: Sequence[Sequence[int]] | torch.Tensor = ()
    actions: Sequence[int] | torch.Tensor = ()
    candidates: Sequence[Sequence[int]] | torch.Tensor = ()


_FIELDS = ("tokens", "token_type", "item", "block", "order", "pos_i", "pos_j", "pos_flat")
# What a padding slot holds in each field.
_PAD_ROW = {
    "tokens": 0,
    "token_type": int(TokenType.PAD),
    "item": -1,
    "block": -1,
    "order": -1,
    "pos_i": 0,
    "pos_j": 0,
    "pos_flat": 0,
}
Row = tuple[int, int, int, int, int, int, int, int]  # in _FIELDS order


@dataclass
class TokenStream:
    """A right-padded batch of token streams; every field is a (B, S) int64 tensor."""

    tokens: torch.Tensor
    token_type: torch.Tensor
    item: torch.Tensor
    block: torch.Tensor
    order: torch.Tensor
    pos_i: torch.Tensor
    pos_j: torch.Tensor
    pos_flat: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.token_type != TokenType.PAD  # (B, S)

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(1)  # (B,)

    @property
    def n_items(self) -> torch.Tensor:
        """History items per user (candidates excluded)."""
        history = (self.token_type == TokenType.ANCHOR) | (self.token_type == TokenType.ACTION)
        items = torch.where(history, self.item, 0)  # (B, S)
        return items.amax(1) if items.shape[1] else items.new_zeros(items.shape[0])  # (B,)

    @property
    def n_candidates(self) -> torch.Tensor:
        return (self.token_type == TokenType.CAND_ANCHOR).sum(1)  # (B,)

    def rotary_positions(self, rope: Literal["hrope", "rope1d"]) -> torch.Tensor:
        """(B, S, 2) coordinates for the rotary module: (i, j), or (flat, 0) for rope1d."""
        if rope == "hrope":
            return torch.stack([self.pos_i, self.pos_j], dim=-1)
        return torch.stack([self.pos_flat, torch.zeros_like(self.pos_flat)], dim=-1)

    def cat(self, other: TokenStream) -> TokenStream:
        """Concatenate along S (a cache's slots followed by new tokens)."""
        return TokenStream(
            **{f.name: torch.cat([getattr(self, f.name), getattr(other, f.name)], 1) for f in fields(self)}
        )

    def span(self, start: int, stop: int) -> TokenStream:
        """Positions ``[start, stop)`` of every field (views)."""
        return TokenStream(**{f.name: getattr(self, f.name)[:, start:stop] for f in fields(self)})

    def gather(self, index: torch.Tensor, keep: torch.Tensor) -> TokenStream:
        """Pick slots ``index`` (B, M); where ``keep`` (B, M) is False the slot becomes padding."""
        out = {}
        for f in fields(self):
            picked = getattr(self, f.name).gather(1, index)  # (B, M)
            out[f.name] = torch.where(keep, picked, _PAD_ROW[f.name])
        return TokenStream(**out)

    def to(self, device: torch.device | str) -> TokenStream:
        return TokenStream(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _as_rows(x: Sequence[Sequence[int]] | torch.Tensor, width: int, what: str, user: int) -> list[list[int]]:
    rows = x.tolist() if isinstance(x, torch.Tensor) else [list(r) for r in x]
    for t, r in enumerate(rows):
        if len(r) != width:
            raise ValueError(f"user {user}, {what} {t}: expected {width} semantic IDs, got {len(r)}")
    return rows


def _check_range(value: int, high: int, where: str) -> None:
    if not 0 <= value < high:
        raise ValueError(f"{where}: id {value} is outside [0, {high})")


def _validate(
    layout: StreamLayout,
    user: int,
    profile: Sequence[int],
    sids: list[list[int]],
    actions: list[int],
    candidates: list[list[int]],
) -> None:
    """Raise ``ValueError`` naming the user and position (in the input as given) of any bad id."""
    if len(actions) != len(sids):
        raise ValueError(f"user {user}: {len(sids)} history items but {len(actions)} actions")
    for j, p in enumerate(profile):
        _check_range(p, layout.profile_vocab_size, f"user {user}, profile token {j}")
    for t, (codes, action) in enumerate(zip(sids, actions, strict=True)):
        for c, code in enumerate(codes):
            _check_range(code, layout.codebook_size, f"user {user}, history item {t}, semantic ID {c}")
        _check_range(action, layout.n_actions, f"user {user}, history item {t}, action")
    for n, codes in enumerate(candidates):
        for c, code in enumerate(codes):
            _check_range(code, layout.codebook_size, f"user {user}, candidate {n}, semantic ID {c}")


def _user_rows(
    layout: StreamLayout,
    profile: Sequence[int],
    sids: list[list[int]],
    actions: list[int],
    candidates: list[list[int]],
    first_item: int,
    first_order: int,
) -> list[Row]:
    """All tokens of one user's stream (or of a continuation of it) as rows, inputs validated.

    ``first_item`` / ``first_order`` let a continuation (new items or candidates scored
    against a cache, inference.py) carry on the coordinates of a stream encoded earlier;
    the full stream uses 1 and 0. This is the only place coordinates are assigned.
    """
    rows: list[Row] = []

    def emit(token: int, kind: TokenType, item: int, block: int, i: int, j: int, flat: int | None = None) -> None:
        order = first_order + len(rows)
        rows.append((token, int(kind), item, block, order, i, j, order if flat is None else flat))

    for j, p in enumerate(profile):
        emit(layout.profile_offset + p, TokenType.PROFILE, 0, -1, 0, j)
    for t, (codes, action) in enumerate(zip(sids, actions, strict=True)):
        i = first_item + t
        for c, code in enumerate(codes):
            emit(layout.sid_token(c, code), TokenType.SID, i, -1, i, c)
        emit(layout.anchor_id, TokenType.ANCHOR, i, -1, i, layout.n_sid)
        emit(layout.action_token(action), TokenType.ACTION, i, -1, i, layout.n_sid + 1)
    # Re-alignment (docs/method.md §4): every candidate at i = T + 1, flat position = first candidate's.
    i_cand, flat_cand = first_item + len(sids), first_order + len(rows)
    for n, codes in enumerate(candidates):
        for c, code in enumerate(codes):
            emit(layout.sid_token(c, code), TokenType.CAND_SID, i_cand, n, i_cand, c, flat_cand + c)
        emit(layout.anchor_id, TokenType.CAND_ANCHOR, i_cand, n, i_cand, layout.n_sid, flat_cand + layout.n_sid)
    return rows


def _pad(rows_per_user: list[list[Row]]) -> TokenStream:
    width = max((len(r) for r in rows_per_user), default=0)
    pad = tuple(_PAD_ROW[f] for f in _FIELDS)
    grid = [r + [pad] * (width - len(r)) for r in rows_per_user]
    data = torch.tensor(grid, dtype=torch.long).reshape(len(rows_per_user), width, len(_FIELDS))  # (B, S, F)
    return TokenStream(**{f: data[..., k] for k, f in enumerate(_FIELDS)})


def build_stream(users: Sequence[UserSequence], layout: StreamLayout) -> TokenStream:
    """Token streams for a batch of users, right-padded to the longest.

    Raises ``ValueError`` naming the user and position (in the input as given, before
    truncation) of any id outside its vocabulary, of a row with the wrong number of
    semantic IDs, of a history whose action count differs, or of a profile that is too long.
    History beyond ``layout.max_items`` items keeps the most recent ones (module docstring).
    """
    all_rows = []
    for b, u in enumerate(users):
        profile = u.profile.tolist() if isinstance(u.profile, torch.Tensor) else list(u.profile)
        sids = _as_rows(u.sids, layout.n_sid, "history item", b)
        actions = u.actions.tolist() if isinstance(u.actions, torch.Tensor) else list(u.actions)
        candidates = _as_rows(u.candidates, layout.n_sid, "candidate", b)
        _validate(layout, b, profile, sids, actions, candidates)
        if len(profile) > layout.max_profile_len:
            raise ValueError(
                f"user {b}: profile has {len(profile)} tokens, more than max_profile_len={layout.max_profile_len}"
            )
        sids, actions = sids[-layout.max_items :], actions[-layout.max_items :]
        all_rows.append(_user_rows(layout, profile, sids, actions, candidates, first_item=1, first_order=0))
    return _pad(all_rows)


def continue_stream(
    layout: StreamLayout,
    n_items: torch.Tensor,
    next_order: torch.Tensor,
    sids: torch.Tensor | None = None,
    actions: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
) -> TokenStream:
    """Tokens that continue already-encoded streams (inference.py's cache).

    ``n_items`` (B,) and ``next_order`` (B,) say where each user's encoded stream ended;
    ``sids`` (B, T_new, k) with ``actions`` (B, T_new) are new history items, and
    ``candidates`` (B, N, k) candidates after them. Coordinates come from the same
    ``_user_rows`` as ``build_stream``, so both paths agree by construction. The result
    lives on ``n_items``'s device.
    """
    rows = []
    for b in range(n_items.shape[0]):
        new_sids = _as_rows(sids[b], layout.n_sid, "history item", b) if sids is not None else []
        new_actions = actions[b].tolist() if actions is not None else []
        cands = _as_rows(candidates[b], layout.n_sid, "candidate", b) if candidates is not None else []
        _validate(layout, b, (), new_sids, new_actions, cands)
        rows.append(_user_rows(layout, (), new_sids, new_actions, cands, int(n_items[b]) + 1, int(next_order[b])))
    return _pad(rows).to(n_items.device)


def candidate_stream(
    layout: StreamLayout, n_items: torch.Tensor, next_order: torch.Tensor, candidates: torch.Tensor
) -> TokenStream:
    """``continue_stream(candidates=...)`` in tensor ops, for every user with all N candidates.

    ``candidates`` (B, N, k) local codes, not validated here (``score_with_cache`` checks
    them; the ONNX graph clamps them and flags the user). Each candidate is a block
    ``[c_1 .. c_k, ANCHOR]`` at item i = n_items + 1, re-aligned to the first candidate's
    flat position, blocks in order. No Python loop over tokens: this runs on every Rank
    call and inside the exported graph. Tested equal to ``continue_stream``.
    """
    B, N, k = candidates.shape
    dev = candidates.device
    c = torch.arange(k, device=dev)
    sid = layout.sid_offset + c * layout.codebook_size + candidates  # (B, N, k)
    tokens = torch.cat([sid, torch.full_like(sid[..., :1], layout.anchor_id)], -1)  # (B, N, k + 1)
    j = torch.arange(k + 1, device=dev).expand(B, N, k + 1)  # intra-item coordinate
    n = torch.arange(N, device=dev)[None, :, None].expand(B, N, k + 1)  # candidate block
    token_type = torch.where(j < k, int(TokenType.CAND_SID), int(TokenType.CAND_ANCHOR))
    item = (n_items + 1)[:, None, None].expand(B, N, k + 1)  # every candidate at i = T + 1
    order = next_order[:, None, None] + n * (k + 1) + j
    flat = next_order[:, None, None] + j  # re-aligned: every candidate at the first one's flat position
    fields = (tokens, token_type, item, n, order, item, j, flat)
    return TokenStream(*(f.reshape(B, N * (k + 1)) for f in fields))
