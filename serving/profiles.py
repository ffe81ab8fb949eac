"""Profile tokens for Rank: the P tokens that open every user's stream (features/profiles.py).

The online store keeps behaviour (the SID stream), not user attributes, so the profile
table is loaded at start: from a ranker checkpoint's saved ``ProfileVocab`` applied to a
users table (the dataset's, row ``u`` = user id ``u``, as the event replay keys users).
A user the table does not know, and every user when there is no table, gets the vocab's
"unknown" token of every column: a well-formed stream, as for a brand-new user in training
(a cold user is then scored from that profile alone). Without a vocabulary the profile is
empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from features.profiles import UNKNOWN, ProfileVocab


@dataclass(frozen=True)
class Profiles:
    """User id -> profile ids; ``table`` row u is user u's, ``default`` everyone else's."""

    table: np.ndarray | None  # (U, P) int64
    default: tuple[int, ...]

    def tokens(self, user_id: int) -> Sequence[int]:
        if self.table is not None and 0 <= user_id < len(self.table):
            return self.table[user_id].tolist()
        return self.default

    @classmethod
    def empty(cls) -> Profiles:
        return cls(None, ())

    @classmethod
    def from_vocab(cls, vocab: ProfileVocab, users=None) -> Profiles:
        """``users``: a users DataFrame in user-id order (None: everyone gets the unknown profile)."""
        default = tuple(vocab.offsets[c] + UNKNOWN for c in vocab.columns)
        return cls(None if users is None else vocab.encode(users), default)
