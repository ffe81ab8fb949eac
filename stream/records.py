"""Pure functions from raw Kafka bytes to validated events, and from results to outputs.

Everything a stream agent decides lives here or in ``stream.processing``, so it is unit
tested without a broker. Validation raises ``EventRejected`` with a machine-readable
``reason``; the agents turn that into a DeadLetter instead of crashing or dropping.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from features import encoding as enc
from features.actions import label_of
from features.store.records import CORRUPT_USER_STATE as _CORRUPT_USER_STATE
from features.store.records import MAX_EVENT_ID_BYTES
from hisam_pb.v1 import events_pb2 as pb

# Reasons carried by DeadLetter.reason (stable strings: dashboards and replays key on them).
DECODE_ERROR = "decode_error"
INVALID_FIELD = "invalid_field"
UNKNOWN_ITEM = "unknown_item"
UNKNOWN_MODALITY = "unknown_modality"
WRONG_WIDTH = "wrong_width"
NON_FINITE_EMBEDDING = "non_finite_embedding"
NO_EMBEDDING = "no_embedding"
TOKENIZER_INPUT = "tokenizer_input"
# Every ID the collision rule may give the item (its prefix, any last code) is taken.
SID_SPACE_FULL = "sid_space_full"
# The online store refused the action: its user's stored state is corrupt (features.store).
CORRUPT_USER_STATE = _CORRUPT_USER_STATE
# The action's event time lies outside the accepted skew around the worker's clock.
EVENT_TIME_OUT_OF_RANGE = "event_time_out_of_range"

_ACTION_TYPES = frozenset(pb.ActionType.values())  # the enum builds a new list on every call


class EventRejected(ValueError):
    """An event that cannot be processed; ``reason`` is one of the module constants."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConsumedRecord(Protocol):
    """What the processors read of a consumed record: aiokafka's ``ConsumerRecord`` (as the
    worker hands them over, unconverted) and ``RawMessage`` both have it."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True)
class RawMessage:
    """One consumed Kafka record, as much as a dead letter needs to point back at it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


M = TypeVar("M", bound=Message)


def parse_message(
    message_type: type[M], raw: bytes | None, rejected: Callable[[str, str], Exception] | None = None
) -> M:
    """``message_type`` parsed from ``raw``; an empty or undecodable payload raises
    ``rejected(DECODE_ERROR, detail)`` (``EventRejected`` unless the caller names its own)."""
    rejected = rejected or EventRejected
    if not raw:
        raise rejected(DECODE_ERROR, "empty message")
    try:
        return message_type.FromString(raw)
    except DecodeError as e:
        name = message_type.DESCRIPTOR.name
        raise rejected(DECODE_ERROR, f"not {'an' if name[0] in 'AEIOU' else 'a'} {name}: {e}") from e


@dataclass(frozen=True)
class EventTimeBounds:
    """The event times an action may carry, relative to the worker's clock (None: unbounded).

    The future bound catches clocks gone wrong and made-up times (1 hour by default). The
    past bound is off by default: a replay of a recorded dataset (``hisam run``, the
    benchmarks) carries the dataset's own times, years old, and must be appended.
    """

    max_future_ms: int | None = 3_600_000
    max_past_ms: int | None = None

    def check(self, event_time_ms: int, now_ms: int) -> None:
        if self.max_future_ms is not None and event_time_ms > now_ms + self.max_future_ms:
            raise EventRejected(
                EVENT_TIME_OUT_OF_RANGE,
                f"event_time_ms {event_time_ms} is {event_time_ms - now_ms} ms ahead of the worker's clock "
                f"(at most {self.max_future_ms})",
            )
        if self.max_past_ms is not None and event_time_ms < now_ms - self.max_past_ms:
            raise EventRejected(
                EVENT_TIME_OUT_OF_RANGE,
                f"event_time_ms {event_time_ms} is {now_ms - event_time_ms} ms behind the worker's clock "
                f"(at most {self.max_past_ms})",
            )


def decode_action(
    raw: bytes | None, bounds: EventTimeBounds | None = None, now_ms: int | None = None
) -> pb.ActionEvent:
    """Parse and validate an ActionEvent; raises EventRejected.

    ``bounds``: the accepted event times around ``now_ms`` (default: the clock); None: any
    positive time.
    """
    ev = parse_message(pb.ActionEvent, raw)
    if not ev.event_id or "\x00" in ev.event_id:
        raise EventRejected(INVALID_FIELD, "event_id must be a non-empty string without NUL")
    if len(ev.event_id) * 4 > MAX_EVENT_ID_BYTES and len(ev.event_id.encode("utf-8")) > MAX_EVENT_ID_BYTES:
        raise EventRejected(
            INVALID_FIELD,
            f"event_id is longer than {MAX_EVENT_ID_BYTES} bytes: {ev.event_id[:40]!r}... "
            f"({len(ev.event_id.encode('utf-8'))} bytes)",
        )
    if ev.user_id < 0 or ev.item_id < 0:
        raise EventRejected(INVALID_FIELD, f"negative id (user {ev.user_id}, item {ev.item_id})")
    if ev.action == pb.ACTION_TYPE_UNSPECIFIED or ev.action not in _ACTION_TYPES:
        raise EventRejected(INVALID_FIELD, f"action {ev.action} is unspecified or unknown")
    if ev.event_time_ms <= 0:
        raise EventRejected(INVALID_FIELD, f"event_time_ms must be positive, got {ev.event_time_ms}")
    if bounds is not None:
        bounds.check(ev.event_time_ms, int(time.time() * 1000) if now_ms is None else now_ms)
    return ev


@dataclass(frozen=True)
class ItemFeatures:
    """A validated ItemEvent and its embeddings, ready for the tokenizer."""

    event: pb.ItemEvent
    features: dict[str, np.ndarray]  # modality -> (D_m,) float32, only the present ones


def decode_item(raw: bytes | None, modalities: Mapping[str, int]) -> ItemFeatures:
    """Parse and validate an ItemEvent against the tokenizer's modalities; raises EventRejected."""
    ev = parse_message(pb.ItemEvent, raw)
    if ev.item_id < 0:
        raise EventRejected(INVALID_FIELD, f"negative item_id {ev.item_id}")
    feats: dict[str, np.ndarray] = {}
    for name, vec in ev.embeddings.items():
        if name not in modalities:
            raise EventRejected(UNKNOWN_MODALITY, f"modality {name!r}; the tokenizer takes {sorted(modalities)}")
        arr = np.asarray(vec.values, dtype=np.float32)
        if arr.shape != (modalities[name],):
            raise EventRejected(WRONG_WIDTH, f"modality {name!r} has width {arr.shape[0]}, expected {modalities[name]}")
        if not np.isfinite(arr).all():
            bad = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise EventRejected(NON_FINITE_EMBEDDING, f"modality {name!r} has {arr[bad]} at index {bad}")
        feats[name] = arr
    if not feats:
        raise EventRejected(NO_EMBEDDING, f"item {ev.item_id} carries no embedding of {sorted(modalities)}")
    return ItemFeatures(ev, feats)


def training_sample(
    ev: pb.ActionEvent,
    history_tokens: np.ndarray,
    history_actions: np.ndarray,
    target_tokens: tuple[int, ...],
    tokenizer_version: str,
) -> pb.TrainingSample:
    """The sample for one action: the stream before it, and its item as the target."""
    return pb.TrainingSample(
        user_id=ev.user_id,
        history_tokens=np.asarray(history_tokens, np.int64).ravel().tolist(),
        history_actions=np.asarray(history_actions, np.int64).tolist(),
        target_item_id=ev.item_id,
        target_tokens=list(target_tokens),
        target_action=ev.action,
        label=label_of(ev.action),
        event_id=ev.event_id,
        event_time_ms=ev.event_time_ms,
        tokenizer_version=tokenizer_version,
        n_codes=len(target_tokens),
    )


_varint = enc.varint  # protobuf bytes built by hand (features.encoding)
_BYTES = enc.VARINT_BYTES


def _len_delimited(tag: int, payload: bytes) -> bytes:
    if not payload:
        return b""  # proto3 writes no empty string or packed field
    return _BYTES[tag] + _varint(len(payload)) + payload


_USER_ID_TAG = (1 << 3) | 0  # TrainingSample.user_id
_HISTORY_TOKENS_TAG = (2 << 3) | 2  # TrainingSample.history_tokens, packed
_HISTORY_ACTIONS_TAG = (3 << 3) | 2  # TrainingSample.history_actions, packed
_EVENT_ID_TAG = (8 << 3) | 2  # TrainingSample.event_id
_EVENT_TIME_TAG = (9 << 3) | 0  # TrainingSample.event_time_ms


@functools.lru_cache(maxsize=1 << 16)
def _target_fields(
    item_id: int, target_tokens: tuple[int, ...], action: int, tokenizer_version: str
) -> tuple[bytes, bytes]:
    """Fields 4-7 and 10-11 of a TrainingSample, serialised by protobuf: the same for every
    action of one type on one item, so they are cached (a hot item's are reused)."""
    before = pb.TrainingSample(
        target_item_id=item_id, target_tokens=target_tokens, target_action=action, label=label_of(action)
    ).SerializeToString()
    after = pb.TrainingSample(tokenizer_version=tokenizer_version, n_codes=len(target_tokens)).SerializeToString()
    return before, after


def training_sample_bytes(
    ev: pb.ActionEvent,
    history_tokens_packed: bytes,
    history_actions_packed: bytes,
    target_tokens: tuple[int, ...],
    tokenizer_version: str,
) -> bytes:
    """``training_sample(...).SerializeToString()``, byte for byte, from a packed history.

    The online store hands back the history as packed varints, which is exactly how the
    sample's two repeated fields travel on the wire: they are copied, not decoded into
    Python ints and encoded again (a full T=300 history is 1,800 tokens). Fields are
    written in field-number order, as protobuf serialises them; zero scalars and empty
    strings and lists are left out (proto3). The fields that depend only on the item and
    the action type come from protobuf itself (``_target_fields``); the per-event ones are
    written here.
    """
    target, version = _target_fields(ev.item_id, tuple(target_tokens), ev.action, tokenizer_version)
    user_id, event_time_ms = ev.user_id, ev.event_time_ms
    return b"".join(
        (
            _BYTES[_USER_ID_TAG] + _varint(user_id) if user_id else b"",
            _len_delimited(_HISTORY_TOKENS_TAG, history_tokens_packed),
            _len_delimited(_HISTORY_ACTIONS_TAG, history_actions_packed),
            target,
            _len_delimited(_EVENT_ID_TAG, ev.event_id.encode("utf-8")),
            _BYTES[_EVENT_TIME_TAG] + _varint(event_time_ms) if event_time_ms else b"",
            version,
        )
    )


@dataclass(frozen=True)
class DeadLetterLimits:
    """How much of a record a dead letter carries: the broker refuses records over its
    ``message.max.bytes`` (1 MB by default), and a dead letter the broker refuses would stop
    its partition. Whatever is cut is identified by its size and SHA-256 (``dead_letter``)."""

    key_bytes: int = 1024
    value_bytes: int = 64 * 1024
    detail_chars: int = 1024

    def __post_init__(self) -> None:
        if min(self.key_bytes, self.value_bytes, self.detail_chars) < 0:
            raise ValueError(f"dead-letter limits must be non-negative, got {self}")


# What a dead letter keeps when the broker refused it once (stream.outputs): no value.
MINIMAL_DEAD_LETTER = DeadLetterLimits(key_bytes=64, value_bytes=0, detail_chars=256)


def _clip(text: str, n: int) -> str:
    """``text`` in at most ``n`` characters, "..." marking a cut."""
    if len(text) <= n:
        return text
    return text[: n - 3] + "..." if n >= 3 else text[:n]


def dead_letter(
    msg: ConsumedRecord, reason: str, detail: str, now_ms: int, limits: DeadLetterLimits | None = None
) -> pb.DeadLetter:
    """The DeadLetter of a consumed record, bounded by ``limits``.

    It carries the record's topic, partition and offset, its key and value cut to the
    limits, the reason, the detail cut to its limit, and the whole key's and value's sizes
    and SHA-256, so a cut record can still be matched to its source.
    """
    limits = limits or DeadLetterLimits()
    key, raw = msg.key or b"", msg.value or b""
    return pb.DeadLetter(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key=key[: limits.key_bytes],
        raw=raw[: limits.value_bytes],
        reason=reason,
        detail=_clip(detail, limits.detail_chars),
        error_time_ms=now_ms,
        key_sha256=hashlib.sha256(key).digest(),
        raw_sha256=hashlib.sha256(raw).digest(),
        key_size=len(key),
        raw_size=len(raw),
    )


def shrink_dead_letter(value: bytes, limits: DeadLetterLimits = MINIMAL_DEAD_LETTER) -> tuple[bytes, bytes]:
    """A serialised DeadLetter cut to ``limits`` (by default: no value), as (Kafka key, value).

    For a dead letter the broker refused: the whole record's sizes and hashes are kept, and
    the detail says the value was dropped. A value that is no DeadLetter becomes one that says so.
    """
    try:
        d = pb.DeadLetter.FromString(value)
    except DecodeError:
        d = pb.DeadLetter(reason=DECODE_ERROR, detail=f"an unreadable dead letter of {len(value)} bytes")
    note = ""
    if len(d.raw) > limits.value_bytes:
        note = f" (value dropped: the broker refused the {len(value)}-byte dead letter)"
    d.detail = _clip(d.detail, max(0, limits.detail_chars - len(note))) + note
    d.key = d.key[: limits.key_bytes]
    d.raw = d.raw[: limits.value_bytes]
    return d.key, d.SerializeToString()


def action_event(event_id: str, user_id: int, item_id: int, action: int, event_time_ms: int) -> pb.ActionEvent:
    """Build an ActionEvent (used by the replay producer and tests)."""
    return pb.ActionEvent(
        event_id=event_id, user_id=user_id, item_id=item_id, action=action, event_time_ms=event_time_ms
    )


def item_event(
    item_id: int, embeddings: Mapping[str, np.ndarray], event_time_ms: int, title: str = "", text: str = ""
) -> pb.ItemEvent:
    """Build an ItemEvent from per-modality vectors (None or absent: modality missing)."""
    ev = pb.ItemEvent(item_id=item_id, title=title, text=text, event_time_ms=event_time_ms)
    for name, vec in embeddings.items():
        if vec is not None:
            ev.embeddings[name].values.extend(float(x) for x in np.asarray(vec, np.float32).ravel())
    return ev


def user_key(user_id: int) -> bytes:
    """Partition key of user-actions: the user id as decimal ASCII (same user, same partition)."""
    return str(int(user_id)).encode()
