"""From a Dataset to HMAT inputs: training sequences and evaluation streams (docs/method.md §3, §5).

Letters: U users, N items, k semantic IDs per item, T history items (``max_items``),
P profile tokens.

Inputs shared by both directions: ``item_codes`` (N, k) local codes in [0, K) (row i is
item i: ``recipes.ranker.inputs.semantic_codes`` for the SID models,
``models.hmat.baselines.id_codes`` for the ID baseline) and ``profiles`` (U, P) profile ids (``ProfileVocab.encode(ds.users)``).
A history item is its codes plus its action = the interaction's label (rating > 3).

Training (``training_sequences``): each user's *train* interactions in time order, cut
into windows of at most T items, newest window ending at the user's last train
interaction and each older one ending where the next begins (``stride`` = T: every
interaction is a target exactly once; a smaller stride overlaps the windows). Only the
most recent T would also be "bounded to T", but would throw away most of the history of
heavy users (ML-100K: a quarter of them have more than 147 train interactions).

Evaluation (``eval_set``), one of two protocols:

- ``"stream"`` (default): each test interaction is scored with the user's history up to,
  not including, itself: every train interaction of the user plus the user's *earlier*
  test interactions with their observed labels, the last T of them. This is what a
  near-line deployment sees (feedback reaches the history as it happens while the
  weights stay frozen), and it is the only reading under which the cold users of a
  global time split (ML-100K: 77 users with < 10 train interactions but 7,150 test rows)
  are scored with any context. "Earlier" is the position in the time-sorted log, the
  same order that defines the split, so ties in timestamp resolve the same way.
- ``"train"``: history = train interactions only; all test items of a user are scored in
  one pass as candidates of one stream. Cheaper (one stream per user), and the protocol
  of papers that freeze histories at the split.

In both, a test row's own interaction (and anything after it) never enters its history.
Under ``"stream"`` the rows of a user are kept as one ``Timeline`` (train history, then
test events), from which both the one-stream-per-row definition and the grouped scorer
read (recipes/ranker/evaluate.py), so the two cannot disagree about what a history is.
Everything is deterministic: users in index order, interactions in log order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from data import Dataset
from models.hmat.sequence import UserSequence
from recipes.ranker.evaluate import Timeline, timeline_examples

Protocol = Literal["stream", "train"]
PROTOCOLS: tuple[str, ...] = ("stream", "train")


@dataclass
class EvalSet:
    """Test rows to score, one row per test interaction, and the streams that score them.

    The row arrays (R,) follow the scoring order: users in index order, each user's test
    interactions in log order. ``row`` is the interaction's position in
    ``Dataset.interactions``. The streams: under ``"stream"``, ``timelines`` (one per user,
    its test interactions as events; ``recipes.ranker.evaluate.score_timelines`` scores them
    with the anchor KV cache); under ``"train"``, ``train_examples`` (one stream per user,
    its test items as candidates). ``examples`` is one stream per row under ``"stream"``
    (the protocol's definition, ``timeline_examples``) and ``train_examples`` otherwise,
    for ``score_examples``; either way its flattened candidates follow the row order.
    """

    user_idx: np.ndarray
    item_idx: np.ndarray
    label: np.ndarray
    row: np.ndarray
    protocol: str
    max_items: int
    timelines: list[Timeline] = field(default_factory=list)
    train_examples: list[UserSequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.row)

    @cached_property
    def examples(self) -> list[UserSequence]:
        if self.protocol == "train":
            return self.train_examples
        return timeline_examples(self.timelines, self.max_items)


def _user_rows(ds: Dataset, users: np.ndarray | None) -> dict[int, np.ndarray]:
    """user_idx -> positions of the user's interactions in log order, for the selected users."""
    groups = ds.interactions.groupby("user_idx", sort=True).indices  # positions, ascending
    keep = None if users is None else {int(u) for u in users}
    return {int(u): np.asarray(p) for u, p in groups.items() if keep is None or int(u) in keep}


def _check_inputs(ds: Dataset, item_codes: np.ndarray, profiles: np.ndarray, max_items: int) -> None:
    if item_codes.ndim != 2 or item_codes.shape[0] != ds.n_items:
        raise ValueError(f"item_codes must be (n_items={ds.n_items}, k), got {item_codes.shape}")
    if profiles.ndim != 2 or profiles.shape[0] != ds.n_users:
        raise ValueError(f"profiles must be (n_users={ds.n_users}, P), got {profiles.shape}")
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")


def _history(codes: torch.Tensor, items: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) codes and (T,) actions of the given interactions."""
    return codes[torch.from_numpy(items)], torch.from_numpy(labels.astype(np.int64))


def training_sequences(
    ds: Dataset,
    item_codes: np.ndarray,
    profiles: np.ndarray,
    max_items: int,
    stride: int | None = None,
    users: np.ndarray | None = None,
) -> list[UserSequence]:
    """History-only sequences over train interactions, windows of at most ``max_items`` (module docstring)."""
    _check_inputs(ds, item_codes, profiles, max_items)
    stride = max_items if stride is None else stride
    if not 1 <= stride <= max_items:
        raise ValueError(f"stride must be in [1, max_items={max_items}], got {stride}")
    codes = torch.from_numpy(np.asarray(item_codes, dtype=np.int64))
    item = ds.interactions["item_idx"].to_numpy()
    label = ds.interactions["label"].to_numpy()
    n_train = len(ds.train)
    out = []
    for u, rows in _user_rows(ds, users).items():
        rows = rows[rows < n_train]
        profile = profiles[u].tolist()
        ends = list(range(len(rows), 0, -stride))[::-1]  # oldest window first
        for end in ends:
            window = rows[max(0, end - max_items) : end]
            sids, actions = _history(codes, item[window], label[window])
            out.append(UserSequence(profile=profile, sids=sids, actions=actions))
    return out


def eval_set(
    ds: Dataset,
    item_codes: np.ndarray,
    profiles: np.ndarray,
    max_items: int,
    protocol: Protocol = "stream",
    users: np.ndarray | None = None,
) -> EvalSet:
    """Streams that score every test interaction of the selected users (module docstring)."""
    _check_inputs(ds, item_codes, profiles, max_items)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not one of {PROTOCOLS}")
    codes = torch.from_numpy(np.asarray(item_codes, dtype=np.int64))
    item = ds.interactions["item_idx"].to_numpy()
    label = ds.interactions["label"].to_numpy()
    n_train = len(ds.train)
    timelines: list[Timeline] = []
    train_examples: list[UserSequence] = []
    scored: list[np.ndarray] = []
    for u, rows in _user_rows(ds, users).items():
        profile = profiles[u].tolist()
        first_test = int(np.searchsorted(rows, n_train))  # rows are ascending; train precedes test
        if first_test == len(rows):
            continue
        test = rows[first_test:]
        scored.append(test)
        if protocol == "train":
            window = rows[max(0, first_test - max_items) : first_test]
            sids, actions = _history(codes, item[window], label[window])
            train_examples.append(UserSequence(profile, sids, actions, codes[torch.from_numpy(item[test])]))
        else:
            # The whole train history: the window of each event is cut when it is scored.
            sids, actions = _history(codes, item[rows[:first_test]], label[rows[:first_test]])
            event_sids, event_actions = _history(codes, item[test], label[test])
            timelines.append(Timeline(profile, sids, actions, event_sids, event_actions))
    row = np.concatenate(scored) if scored else np.zeros(0, dtype=np.int64)
    inter = ds.interactions
    return EvalSet(
        user_idx=inter["user_idx"].to_numpy()[row],
        item_idx=item[row],
        label=label[row].astype(np.int64),
        row=row.astype(np.int64),
        protocol=protocol,
        max_items=max_items,
        timelines=timelines,
        train_examples=train_examples,
    )
