"""MA-Attn mask (models/hmat/mask.py) against hand-drawn matrices (docs/method.md §3, §4), and
its structures (memory tokens, ``StreamBlocks``, the FlexAttention metadata) against the mask."""

from __future__ import annotations

import pytest
import torch

from models.hmat.mask import (
    attention_mask,
    flex_mask_mod,
    memory_first,
    memory_tokens,
    plain_causal,
    segment_reach,
    stream_blocks,
)
from models.hmat.sequence import StreamLayout, TokenType, UserSequence, build_stream

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


# --- Structures of the mask ------------------------------------------------------------------------

RULES = [(True, True), (True, False), (False, True)]
RULE_IDS = ["ma", "anchor-only", "causal"]
SHORT = UserSequence(profile=[2], sids=[[1, 1]], actions=[1], candidates=[[3, 3]])
EMPTY = UserSequence(profile=[1, 2, 3])


def test_memory_tokens_are_what_later_segments_see() -> None:
    s = build_stream([USER], LAYOUT)
    #                                      u  s  s  A  R  s  s  A  R  c  c  C  c  c  C
    assert memory_tokens(s, memory_anchor=True, action_is_memory=True)[0].int().tolist() == [
        1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0,
    ]  # fmt: skip
    assert memory_tokens(s, memory_anchor=True, action_is_memory=False)[0].int().tolist() == [
        1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
    ]  # fmt: skip
    assert memory_tokens(s, memory_anchor=False, action_is_memory=True)[0].int().tolist() == [1] * 9 + [0] * 6
    # The drawn masks' columns: a later item's row sees exactly the memory columns of earlier items.
    for anchor_memory, drawing in ((True, MA_WITH_ACTIONS), (False, MA_ANCHOR_ONLY)):
        memory = memory_tokens(s, memory_anchor=True, action_is_memory=anchor_memory)[0]
        assert torch.equal(drawing[9, :9], memory[:9])  # c11's view of the history


def test_segment_reach_is_one_item() -> None:
    s = build_stream([USER, SHORT, EMPTY], LAYOUT)
    assert segment_reach(s) == LAYOUT.n_sid + 1  # an action looks back to its item's first ID
    assert segment_reach(build_stream([EMPTY], LAYOUT)) == 0  # the profile is memory: no window


@pytest.mark.parametrize("chunk", [1, 4, 6, 100])
@pytest.mark.parametrize(("memory_anchor", "action_is_memory"), RULES, ids=RULE_IDS)
def test_stream_blocks_read_every_allowed_key_once(memory_anchor: bool, action_is_memory: bool, chunk: int) -> None:
    """On real queries the chunks read exactly the mask's keys, each once; padding rows are not empty."""
    s = build_stream([USER, SHORT, EMPTY], LAYOUT)
    rule = {"memory_anchor": memory_anchor, "action_is_memory": action_is_memory}
    blocks = stream_blocks(s, **rule, chunk=chunk)
    counts = blocks.key_counts(s.tokens.shape[1])  # (B, S, S)
    valid = s.valid
    assert torch.equal(counts[valid], attention_mask(s, s, **rule)[valid].long())
    assert (counts[~valid].sum(-1) > 0).all()
    assert [(c.start, c.stop) for c in blocks.chunks][-1][1] == s.tokens.shape[1]


def test_stream_blocks_keys_are_memory_prefix_then_window() -> None:
    """The first chunk past the first item reads only memory tokens before the window."""
    s = build_stream([USER], LAYOUT)
    blocks = stream_blocks(s, memory_anchor=True, action_is_memory=True, chunk=5)
    second = blocks.chunks[1]  # queries 5..9: s21 s22 A2 R2 c11
    keys = blocks.key_index[0, second.key_start : second.key_stop].tolist()
    assert keys == [0, 3, 4, 7, 8] + list(range(5 - 3, 10))  # u A1 R1 A2 R2, then window from s12


def test_plain_causal_needs_no_candidates_and_in_place_order() -> None:
    history = build_stream([UserSequence(profile=[1], sids=[[1, 1]], actions=[1]), EMPTY], LAYOUT)
    assert plain_causal(history, memory_anchor=False)
    assert not plain_causal(history, memory_anchor=True)
    assert not plain_causal(build_stream([USER], LAYOUT), memory_anchor=False)  # candidates: block-diagonal
    history.order[0, 1:] += 1  # order no longer equals position
    assert not plain_causal(history, memory_anchor=False)


@pytest.mark.parametrize(("memory_anchor", "action_is_memory"), RULES, ids=RULE_IDS)
def test_flex_mask_mod_is_the_mask_over_memory_first_keys(memory_anchor: bool, action_is_memory: bool) -> None:
    """The FlexAttention metadata, evaluated densely on CPU (flex's own ``create_mask``)."""
    from torch.nn.attention.flex_attention import create_mask

    s = build_stream([USER, SHORT, EMPTY], LAYOUT)
    rule = {"memory_anchor": memory_anchor, "action_is_memory": action_is_memory}
    key_index = memory_first(s, **rule)  # (B, S)
    B, S = key_index.shape
    memory = memory_tokens(s, **rule).gather(1, key_index)  # (B, S) in key order
    assert torch.equal(memory, memory.int().sort(dim=1, descending=True).values.bool())  # memory first
    assert torch.equal(key_index.sort(dim=1).values, torch.arange(S).expand(B, S))  # a permutation
    got = create_mask(flex_mask_mod(s, key_index, **rule), B, None, S, S, device="cpu")[:, 0]  # (B, S, S)
    want = attention_mask(s, s, **rule).gather(2, key_index[:, None, :].expand(B, S, S))
    valid = s.valid
    assert torch.equal(got[valid], want[valid])
    pad_keys = (s.token_type.gather(1, key_index) == TokenType.PAD)[:, None, :].expand(B, S, S)
    assert torch.equal(got[~valid], pad_keys[~valid])  # padding rows: the padding keys only, never empty
