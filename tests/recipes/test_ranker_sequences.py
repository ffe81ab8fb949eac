"""Training windows and evaluation streams (recipes/ranker/sequences.py).

Item codes are item ids here (``id_codes``), so every history can be read back as the
(item, label) pairs it came from and compared with the interaction log directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data import Dataset
from features.profiles import ProfileVocab
from models.hmat.baselines import id_codes
from models.hmat.model import HMATConfig
from models.hmat.sequence import build_stream
from recipes.ranker import eval_set, training_sequences


def pairs(sids: torch.Tensor, actions: torch.Tensor) -> list[tuple[int, int]]:
    return list(zip(sids[:, 0].tolist(), torch.as_tensor(actions).tolist(), strict=True))


def log_of(ds: Dataset, user: int, before: int | None = None) -> list[tuple[int, int]]:
    """The user's (item, label) pairs in log order, up to position ``before`` (exclusive)."""
    df = ds.interactions
    rows = df[(df.user_idx == user) & (df.index < (len(df) if before is None else before))]
    return list(zip(rows.item_idx.tolist(), rows.label.astype(int).tolist(), strict=True))


@pytest.fixture(scope="module")
def inputs(toy: Dataset) -> tuple[np.ndarray, np.ndarray]:
    return id_codes(toy.n_items), ProfileVocab.fit(toy.users).encode(toy.users)


@pytest.mark.parametrize("max_items", [5, 100])
def test_training_windows_cover_train_once_in_order_bounded_to_t(toy: Dataset, inputs, max_items: int) -> None:
    codes, profiles = inputs
    seqs = training_sequences(toy, codes, profiles, max_items)
    n_train = len(toy.train)
    for s in seqs:
        assert 1 <= len(s.sids) <= max_items and len(s.candidates) == 0
    got = sorted(p for s in seqs for p in pairs(s.sids, s.actions))
    assert got == sorted(zip(toy.train.item_idx.tolist(), toy.train.label.astype(int).tolist(), strict=True))
    # Per user: windows, oldest first, concatenate to the user's train log exactly.
    for u in range(toy.n_users):
        mine = training_sequences(toy, codes, profiles, max_items, users=np.array([u]))
        train_log = log_of(toy, u, before=n_train)
        assert [p for s in mine for p in pairs(s.sids, s.actions)] == train_log
        assert all(s.profile == profiles[u].tolist() for s in mine)
        assert len(mine) == -(-len(train_log) // max_items)
        if len(train_log) >= max_items:
            assert len(mine[-1].sids) == max_items  # the newest window is full


def test_eval_stream_history_is_everything_before_the_row_and_never_the_row(toy: Dataset, inputs) -> None:
    codes, profiles = inputs
    T = 6
    ev = eval_set(toy, codes, profiles, T, protocol="stream")
    assert len(ev) == len(toy.test) == len(ev.examples)
    assert sorted(ev.row.tolist()) == toy.test.index.tolist()
    for u, row, item, label, ex in zip(ev.user_idx, ev.row, ev.item_idx, ev.label, ev.examples, strict=True):
        history = pairs(ex.sids, ex.actions)
        assert history == log_of(toy, int(u), before=int(row))[-T:]  # ordered, bounded, strictly earlier
        assert ex.candidates[:, 0].tolist() == [item] == [toy.interactions.item_idx[row]]
        assert label == int(toy.interactions.rating[row] > 3)
        assert ex.profile == profiles[u].tolist()
    # Some test rows do see earlier test rows of their user (the point of the protocol).
    n_train = len(toy.train)
    assert any(
        len(log_of(toy, int(u), before=int(r))) > len(log_of(toy, int(u), before=n_train))
        for u, r in zip(ev.user_idx, ev.row, strict=True)
    )


def test_eval_stream_timelines_hold_whole_train_history_and_test_events_in_row_order(toy: Dataset, inputs) -> None:
    codes, profiles = inputs
    ev = eval_set(toy, codes, profiles, 6, protocol="stream")
    assert len(ev.timelines) == toy.test.user_idx.nunique()
    events = [p for tl in ev.timelines for p in pairs(tl.event_sids, tl.event_actions)]
    assert events == list(zip(ev.item_idx.tolist(), ev.label.tolist(), strict=True))
    start = 0
    for tl in ev.timelines:
        u = int(ev.user_idx[start])
        assert set(ev.user_idx[start : start + len(tl.event_sids)].tolist()) == {u}
        start += len(tl.event_sids)
        assert pairs(tl.sids, tl.actions) == log_of(toy, u, before=len(toy.train))  # not cut to T
        assert tl.profile == profiles[u].tolist()


def test_eval_train_protocol_uses_train_history_and_one_stream_per_user(toy: Dataset, inputs) -> None:
    codes, profiles = inputs
    ev = eval_set(toy, codes, profiles, 100, protocol="train")
    assert len(ev.examples) == toy.test.user_idx.nunique() and len(ev) == len(toy.test)
    start = 0
    for ex in ev.examples:
        n = len(ex.candidates)
        users = set(ev.user_idx[start : start + n].tolist())
        assert len(users) == 1
        u = users.pop()
        assert pairs(ex.sids, ex.actions) == log_of(toy, u, before=len(toy.train))
        assert ex.candidates[:, 0].tolist() == ev.item_idx[start : start + n].tolist()
        start += n


def test_user_slice_and_determinism(toy: Dataset, inputs) -> None:
    codes, profiles = inputs
    some = np.arange(5)
    a = eval_set(toy, codes, profiles, 4, users=some)
    b = eval_set(toy, codes, profiles, 4, users=some)
    assert set(a.user_idx.tolist()) <= set(range(5))
    assert np.array_equal(a.row, b.row)
    sa, sb = (build_stream(x.examples, _layout()) for x in (a, b))
    assert torch.equal(sa.tokens, sb.tokens)


def _layout():
    return HMATConfig(n_sid=1, codebook_size=60, profile_vocab_size=64, max_items=4, max_profile_len=3).layout


def test_bad_inputs_are_refused(toy: Dataset, inputs) -> None:
    codes, profiles = inputs
    with pytest.raises(ValueError, match="item_codes"):
        training_sequences(toy, codes[:-1], profiles, 4)
    with pytest.raises(ValueError, match="protocol"):
        eval_set(toy, codes, profiles, 4, protocol="random")
    with pytest.raises(ValueError, match="stride"):
        training_sequences(toy, codes, profiles, 4, stride=5)
