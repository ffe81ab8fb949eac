"""What both stores offer, and the pure helpers on Feast's bytes that both (or the tests) share."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from features import encoding as enc
from features.store.config import OnlineStoreConfig
from features.store.records import (
    AppendResult,
    AppliedOffset,
    ItemSids,
    SidClaim,
    StreamAction,
    UserState,
    UserStream,
)

# What ``append_batch`` takes as ``applied``: (topic, partition) -> an offset, or an offset and its timestamp.
Applied = Mapping[tuple[str, int], "int | AppliedOffset"]


class OnlineStoreError(RuntimeError):
    """The online store rejected a write or holds data in an unexpected layout."""


class StreamStore(Protocol):
    """What the stream and serving need from the online store."""

    config: OnlineStoreConfig

    def append(self, action: StreamAction, want_history: bool = True) -> AppendResult: ...

    def append_batch(
        self,
        actions: Sequence[StreamAction],
        want_history: bool = True,
        applied: Applied | None = None,
    ) -> list[AppendResult]:
        """Append in order; ``applied`` ((topic, partition) -> the highest source offset the batch
        applied: appended, duplicate or refused; with its record's timestamp) raises the applied
        record to at least that, atomically with the appends (a batch that fails does not move it)."""
        ...

    def applied_offsets(self, topic: str) -> dict[int, AppliedOffset]:
        """The applied record of ``topic`` (partition -> offset and timestamp), one per namespace,
        whatever the consumer group: where a group without committed offsets resumes (stream/resume.py)."""
        ...

    def read_streams(self, user_ids: Sequence[int]) -> list[UserStream | None]: ...

    def put_item_sids(self, items: Sequence[ItemSids]) -> None: ...

    def claim_item_sids(self, claims: Sequence[SidClaim]) -> list[tuple[int, ...] | None]: ...

    def read_item_sids(self, item_ids: Sequence[int]) -> dict[int, ItemSids]: ...

    def claim_layout(self) -> None:
        """Record the configured n_codes and T the first time; raise OnlineStoreError if another is recorded."""
        ...

    def close(self) -> None: ...


class NamespaceStore(StreamStore, Protocol):
    """A StreamStore that can also list and copy a whole namespace (both stores are)."""

    def entity_ids(self, join_key: str = enc.USER_ID_KEY) -> np.ndarray: ...

    def read_user_states(self, user_ids: Sequence[int]) -> list[UserState | None]: ...

    def write_user_states(self, states: Sequence[UserState]) -> None: ...


def applied_rows(applied: Applied | None) -> list[tuple[str, int, int, int]]:
    """``applied`` as (topic, partition, offset, timestamp ms) rows; ValueError on a topic that is
    not a Kafka topic name or a negative offset (checked before anything is written)."""
    rows = []
    for (topic, part), a in (applied or {}).items():
        off, ts = (a.offset, a.timestamp_ms) if isinstance(a, tuple) else (a, -1)
        if not topic or any(c in topic for c in ": =@\t\n") or int(part) < 0 or int(off) < 0:
            raise ValueError(f"not a source partition and offset: {topic!r}[{part}] @ {off}")
        rows.append((str(topic), int(part), int(off), int(ts if ts is not None and ts >= 0 else -1)))
    return rows


# ---- the stored layout (claim_layout) ------------------------------------------------


def store_layout(config: OnlineStoreConfig) -> dict[str, int]:
    """What the stored streams' bytes depend on: tokens per item and T.

    Not the seen window W: both stores follow a change of W (Redis moves a user's window
    into the new bucket count on its next append; SQLite's window is by sequence number).
    """
    return {"n_codes": config.n_codes, "stream_len": config.stream_len}


def layout_record(config: OnlineStoreConfig) -> str:
    """The layout as the stores record it (one JSON object)."""
    return json.dumps(store_layout(config), sort_keys=True)


def check_layout(stored: str | bytes, config: OnlineStoreConfig, where: str) -> None:
    """Raise OnlineStoreError unless the layout recorded at ``where`` is the configured one."""
    want = store_layout(config)
    try:
        got = json.loads(stored)
    except (TypeError, ValueError):  # not JSON, or no record at all (None)
        got = None
    if got == want:
        return
    shown = ", ".join(f"{k}={v}" for k, v in got.items()) if isinstance(got, dict) else f"{stored!r} (unreadable)"
    raise OnlineStoreError(
        f"the online store (project {config.project!r}) holds streams written with {shown} ({where}), but this "
        f"store is configured with {', '.join(f'{k}={v}' for k, v in want.items())}: every stored stream would "
        f"be misread. Configure the stored layout (--n-codes / --stream-len), or migrate the streams into a new "
        f"namespace with `hisam tokenizer migrate`, or start an empty one (another --project)."
    )


# ---- keys ------------------------------------------------------------------------------

I64 = struct.Struct("<q")


def entity_key_head(join_key: str) -> bytes:
    """Feast's entity key for ``join_key`` without its 8 value bytes (the same for every id)."""
    return enc.entity_key_bytes(join_key, 0)[: -I64.size]


def redis_meta_field(name: str) -> bytes:
    """hisam's own bookkeeping fields in a user's Redis hash (Feast reads only its own fields)."""
    return f"_hisam:{enc.USER_STREAM_FV}:{name}".encode()


def seen_bucket_fields(n_buckets: int) -> list[bytes]:
    """The Redis hash fields of a seen window in ``n_buckets`` buckets."""
    return [redis_meta_field(f"seen:{b}") for b in range(n_buckets)]


# ---- Feast's Values --------------------------------------------------------------------


def read_varint(b: bytes, pos: int) -> tuple[int, int]:
    """The protobuf varint at ``b[pos]`` and the position after it."""
    out = shift = 0
    while True:
        c = b[pos]
        out |= (c & 0x7F) << shift
        pos += 1
        if c < 0x80:
            return out, pos
        shift += 7


def ints_payload(value: bytes) -> bytes:
    """The packed varints of an int64 list Value (empty bytes: none)."""
    if not value:
        return b""
    if value[0] != enc.TAG_INT64_LIST:
        raise OnlineStoreError("a user stream field is not an int64 list Value")
    size, pos = read_varint(value, 1)
    if size == 0:
        return b""
    n, pos = read_varint(value, pos + 1)  # past the packed field's tag
    if pos + n > len(value):
        raise OnlineStoreError("a user stream field's int64 list Value is truncated")
    return value[pos : pos + n]


# The Value type of each stream feature (``enc.STREAM_FEATURES`` order); an absent field has none.
_STREAM_KINDS = ("int64_list_val", "int64_list_val", "string_list_val", "int64_list_val")


def _ints(value: enc.OnlineValue) -> np.ndarray:
    return np.asarray(value.int64_list_val.val, dtype=np.int64)


def decode_user_stream(user_id: int, raw: Sequence[bytes | None], n_codes: int) -> UserStream | None:
    """A user's stream from its four stored Values (``enc.STREAM_FEATURES`` order); None: no stream.

    Raises OnlineStoreError naming the user when the stored Values are not a stream of
    ``n_codes`` tokens per item (undecodable, of another type, or of mismatched lengths).
    """
    if raw[2] is None:  # no event_ids field: the user has no stream yet
        return None
    try:
        tok, act, eids, times = [enc.decode_value(r) for r in raw]
    except Exception as e:  # protobuf's DecodeError, or a stored value that is not bytes
        raise OnlineStoreError(f"user {user_id}: a stored stream field does not decode: {e}") from e
    kinds = [v.WhichOneof("val") for v in (tok, act, eids, times)]
    tokens, actions, event_ids, event_times = _ints(tok), _ints(act), list(eids.string_list_val.val), _ints(times)
    n = len(event_ids)
    foreign = any(k not in (w, None) for k, w in zip(kinds, _STREAM_KINDS))
    if foreign or tokens.size != n * n_codes or len(actions) != n or len(event_times) != n:
        raise OnlineStoreError(
            f"user {user_id}: the stored stream is not in the store's layout: fields {kinds}, {n} event ids, "
            f"{len(actions)} actions, {len(event_times)} times, {tokens.size} tokens ({n_codes} per item expected)"
        )
    return UserStream(int(user_id), tokens.reshape(n, n_codes), actions, event_ids, event_times)


# ---- the Redis seen window's buckets (features/store/redis.py) -------------------------


def seen_bucket(event_id: str, n_buckets: int) -> int:
    """The seen-window bucket of an event id (the append script's ``bucket_of``)."""
    return int(hashlib.sha1(event_id.encode("utf-8")).hexdigest()[:8], 16) % n_buckets


def seen_bucket_values(seen_ids: Sequence[str], n_actions: int, n_buckets: int) -> dict[int, bytes]:
    """A window (oldest first, the newest appended as number ``n_actions``) as bucket values."""
    parts: dict[int, list[bytes]] = {}
    first = n_actions - len(seen_ids) + 1
    for i, e in enumerate(seen_ids):
        parts.setdefault(seen_bucket(e, n_buckets), []).append(b"\x00%s\xff%d" % (e.encode("utf-8"), first + i))
    return {b: b"".join(v) for b, v in parts.items()}


def seen_records(bucket: bytes) -> list[tuple[str, int]]:
    """(event id, seq) of a bucket value, in its order."""
    out = []
    for rec in bucket.split(b"\x00")[1:]:
        e, _, seq = rec.partition(b"\xff")
        out.append((e.decode("utf-8"), int(seq)))
    return out
