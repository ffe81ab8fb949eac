"""MA-Attn mask (models/hmat/mask.py) against hand-drawn matrices (docs/method.md §3, §4)."""

from __future__ import annotations

import torch

from models.hmat.mask import attention_mask
from models.hmat.sequence import StreamLayout, UserSequence, build_stream

# n_sid = 2 keeps the drawing small: profile u, items (s s A R) x 2, candidates (c c C) x 2.
LAYOUT = StreamLayout(n_sid=2, codebook_size=8, profile_vocab_size=4, n_actions=2, max_items=5, max_profile_len=4)
USER = UserSequence(profile=[1], sids=[[0, 1], [2, 3]], actions=[0, 1], candidates=[[4, 5], [6, 7]])


def drawn(rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in line.split()] for line in rows.strip().splitlines()])


#                    u s s A R s s A R c c C c c C
MA_WITH_ACTIONS = drawn("""
                     1 . . . . . . . . . . . . . .
                     1 1 . . . . . . . . . . . . .
                     1 1 1 . . . . . . . . . . . .
                     1 1 1 1 . . . . . . . . . . .
                     1 1 1 1 1 . . . . . . . . . .
                     1 . . 1 1 1 . . . . . . . . .
                     1 . . 1 1 1 1 . . . . . . . .
                     1 . . 1 1 1 1 1 . . . . . . .
                     1 . . 1 1 1 1 1 1 . . . . . .
                     1 . . 1 1 . . 1 1 1 . . . . .
                     1 . . 1 1 . . 1 1 1 1 . . . .
                     1 . . 1 1 . . 1 1 1 1 1 . . .
                     1 . . 1 1 . . 1 1 . . . 1 . .
                     1 . . 1 1 . . 1 1 . . . 1 1 .
                     1 . . 1 1 . . 1 1 . . . 1 1 1
""")

#                    u s s A R s s A R c c C c c C
MA_ANCHOR_ONLY = drawn("""
                     1 . . . . . . . . . . . . . .
                     1 1 . . . . . . . . . . . . .
                     1 1 1 . . . . . . . . . . . .
                     1 1 1 1 . . . . . . . . . . .
                     1 1 1 1 1 . . . . . . . . . .
                     1 . . 1 . 1 . . . . . . . . .
                     1 . . 1 . 1 1 . . . . . . . .
                     1 . . 1 . 1 1 1 . . . . . . .
                     1 . . 1 . 1 1 1 1 . . . . . .
                     1 . . 1 . . . 1 . 1 . . . . .
                     1 . . 1 . . . 1 . 1 1 . . . .
                     1 . . 1 . . . 1 . 1 1 1 . . .
                     1 . . 1 . . . 1 . . . . 1 . .
                     1 . . 1 . . . 1 . . . . 1 1 .
                     1 . . 1 . . . 1 . . . . 1 1 1
""")

#                    u s s A R s s A R c c C c c C
CAUSAL_BLOCKED = drawn("""
                     1 . . . . . . . . . . . . . .
                     1 1 . . . . . . . . . . . . .
                     1 1 1 . . . . . . . . . . . .
                     1 1 1 1 . . . . . . . . . . .
                     1 1 1 1 1 . . . . . . . . . .
                     1 1 1 1 1 1 . . . . . . . . .
                     1 1 1 1 1 1 1 . . . . . . . .
                     1 1 1 1 1 1 1 1 . . . . . . .
                     1 1 1 1 1 1 1 1 1 . . . . . .
                     1 1 1 1 1 1 1 1 1 1 . . . . .
                     1 1 1 1 1 1 1 1 1 1 1 . . . .
                     1 1 1 1 1 1 1 1 1 1 1 1 . . .
                     1 1 1 1 1 1 1 1 1 . . . 1 . .
                     1 1 1 1 1 1 1 1 1 . . . 1 1 .
                     1 1 1 1 1 1 1 1 1 . . . 1 1 1
""")


def test_ma_mask_matches_drawing_with_action_memory() -> None:
    s = build_stream([USER], LAYOUT)
    assert torch.equal(attention_mask(s, s, memory_anchor=True, action_is_memory=True)[0], MA_WITH_ACTIONS)


def test_ma_mask_matches_drawing_anchor_only() -> None:
    s = build_stream([USER], LAYOUT)
    assert torch.equal(attention_mask(s, s, memory_anchor=True, action_is_memory=False)[0], MA_ANCHOR_ONLY)


def test_causal_mask_keeps_candidates_block_diagonal() -> None:
    s = build_stream([USER], LAYOUT)
    assert torch.equal(attention_mask(s, s, memory_anchor=False, action_is_memory=True)[0], CAUSAL_BLOCKED)


def test_padding_keys_hidden_and_padding_rows_finite() -> None:
    short = UserSequence(profile=[2], sids=[[1, 1]], actions=[1])
    s = build_stream([USER, short], LAYOUT)
    m = attention_mask(s, s, memory_anchor=True, action_is_memory=True)  # (2, 15, 15)
    n = int(s.lengths[1])
    assert n == 5
    assert not m[1, :n, n:].any()  # real queries never see padding
    assert m[1, n:].all()  # padding rows see everything, so no softmax row is empty
    assert torch.equal(m[0], MA_WITH_ACTIONS)  # padding another user changes nothing here
