"""What goes into the online store and what comes out of it, the same for both backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from features import encoding as enc
from features.store.config import OnlineStoreConfig

# Longest event id accepted: bounds the seen window's memory (W ids per user).
MAX_EVENT_ID_BYTES = 256

# ``AppendResult.refused``: the user's stored state is not in the layout the store writes
# (a wrong-typed key, a truncated or foreign field); nothing was written for that user.
CORRUPT_USER_STATE = "corrupt_user_state"
# ``AppendResult.refused``: the user was deleted and its grace period has not ended
# (features/store/deletion.py); nothing was written. Not a dead letter: the action is dropped.
USER_DELETED = "user_deleted"


def _unpack(packed: bytes) -> np.ndarray:
    """Packed protobuf varints (a repeated int64 field's payload) -> int64 array."""
    return np.asarray(enc.unpack_varints(packed), np.int64)


class AppliedOffset(NamedTuple):
    """A source partition's highest offset a batch applied, and that record's Kafka timestamp
    (ms; -1: unknown): the applied record (``StreamStore.append_batch``). The timestamp tells
    whether a partition's log is still the one recorded (stream/resume.py)."""

    offset: int
    timestamp_ms: int = -1


@dataclass(frozen=True)
class StreamAction:
    """One action to append: the item's semantic IDs travel with it (looked up upstream)."""

    user_id: int
    event_id: str
    item_id: int
    action: int
    event_time_ms: int
    item_tokens: tuple[int, ...]

    def validate(self, n_codes: int) -> None:
        if not self.event_id or "\x00" in self.event_id:
            raise ValueError(f"event_id must be a non-empty string without NUL, got {self.event_id!r}")
        if len(self.event_id.encode("utf-8")) > MAX_EVENT_ID_BYTES:
            raise ValueError(f"event_id is longer than {MAX_EVENT_ID_BYTES} bytes: {self.event_id[:40]!r}...")
        if len(self.item_tokens) != n_codes:
            raise ValueError(f"item {self.item_id} has {len(self.item_tokens)} tokens, the store keeps {n_codes}")
        if self.action < 0 or self.event_time_ms < 0 or min(self.item_tokens) < 0:
            raise ValueError(f"action, event time and tokens must be non-negative (event {self.event_id})")


@dataclass(frozen=True)
class AppendResult:
    """Outcome of one append.

    ``appended`` is False for a duplicate (an event id in the seen window): nothing was
    written. For an appended action, the history is the user's stream before it, oldest
    first, kept as protobuf packed varints (what both stores hold, and what a
    TrainingSample's repeated fields are on the wire): ``history_tokens`` (P, n_codes) and
    ``history_actions`` (P,) decode them. An append with ``want_history=False`` has an
    empty history.

    ``resampled``: a duplicate whose action the stream still holds comes back with the
    history before it (as the stream holds it now: the original history less any older
    items trimmed since), so the caller can produce its TrainingSample again: a crash
    after the store write and before the sample was sent then loses no sample (samples
    carry the event id; the trainer drops repeats). A duplicate older than the stream has
    ``resampled`` False and an empty history: no sample can be rebuilt for it.

    ``refused``: a reason (e.g. ``CORRUPT_USER_STATE``) when the store would not touch this
    action's user, with ``detail`` naming the key and what is wrong; nothing was written for
    that user, and the caller dead-letters the action. Other users of the batch are unaffected.
    """

    appended: bool
    history_tokens_packed: bytes
    history_actions_packed: bytes
    n_codes: int
    resampled: bool = False
    refused: str = ""
    detail: str = ""

    @property
    def duplicate(self) -> bool:
        return not self.appended and not self.refused

    @property
    def history_tokens(self) -> np.ndarray:
        return _unpack(self.history_tokens_packed).reshape(-1, self.n_codes)  # (P, n_codes)

    @property
    def history_actions(self) -> np.ndarray:
        return _unpack(self.history_actions_packed)


@dataclass(frozen=True)
class UserStream:
    """A user's stored stream, oldest first: tokens (L, n_codes), actions (L,), times (L,)."""

    user_id: int
    tokens: np.ndarray
    actions: np.ndarray
    event_ids: list[str]
    event_times_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.event_ids)


@dataclass(frozen=True)
class ItemSids:
    """An item's semantic IDs from a tokenizer version."""

    item_id: int
    tokens: tuple[int, ...]
    tokenizer_version: str
    event_time_ms: int


@dataclass(frozen=True)
class SidClaim:
    """An item's candidate semantic IDs, best first: ``prefix`` then each of ``last_tokens``.

    The item ingestion's collision rule (docs/method.md: two items never share one full ID):
    the first candidate is the tokenizer's natural ID; the others move only the last,
    finest token, by the last codebook's distances.
    """

    item_id: int
    prefix: tuple[int, ...]  # the first L-1 tokens
    last_tokens: tuple[int, ...]  # candidates for the last token, best first

    def candidate(self, k: int) -> tuple[int, ...]:
        return (*self.prefix, self.last_tokens[k])


@dataclass(frozen=True)
class UserState:
    """Everything the store keeps for one user: stream, seen window and profile counters.

    What copying a user to another namespace must carry over (stream/retokenize/), so
    that appends there continue exactly where they stopped here: ``seen_ids`` is the
    idempotency window, oldest first (at most W); ``n_actions`` the appends ever counted
    (``user_profile:n_actions``); ``last_action_ms`` the newest event time (Feast's event
    time of both user views, and ``user_profile:last_action_ms``).
    """

    stream: UserStream
    seen_ids: list[str]
    n_actions: int
    last_action_ms: int

    def check(self, config: OnlineStoreConfig) -> None:
        """Refuse a state the store's contract cannot hold (before anything is written)."""
        s = self.stream
        n = len(s.event_ids)
        if s.tokens.shape != (n, config.n_codes) or len(s.actions) != n or len(s.event_times_ms) != n:
            raise ValueError(
                f"user {s.user_id}: tokens {s.tokens.shape}, {len(s.actions)} actions, {len(s.event_times_ms)} "
                f"times for {n} events; the store keeps {config.n_codes} tokens per item"
            )
        if n > config.stream_len or len(self.seen_ids) > config.seen_window:
            raise ValueError(
                f"user {s.user_id}: {n} events / {len(self.seen_ids)} seen ids exceed the store's "
                f"T={config.stream_len} / W={config.seen_window}"
            )
        for e in (*s.event_ids, *self.seen_ids):
            if not e or "\x00" in e or len(e.encode("utf-8")) > MAX_EVENT_ID_BYTES:
                raise ValueError(f"user {s.user_id}: invalid event id {e[:40]!r}")
        if self.n_actions < n or self.last_action_ms < 0:
            raise ValueError(f"user {s.user_id}: n_actions {self.n_actions} < {n} events, or negative last time")
