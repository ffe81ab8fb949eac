"""What both stores offer, and the pure helpers on Feast's bytes that both (or the tests) share."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from features import encoding as enc
from features.store.config import OnlineStoreConfig
from features.store.records import AppendResult, ItemSids, SidClaim, StreamAction, UserState, UserStream


class OnlineStoreError(RuntimeError):
    """The online store rejected a write or holds data in an unexpected layout."""


class StreamStore(Protocol):
    """What the stream and serving need from the online store."""

    config: OnlineStoreConfig

    def append(self, action: StreamAction, want_history: bool = True) -> AppendResult: ...

    def append_batch(self, actions: Sequence[StreamAction], want_history: bool = True) -> list[AppendResult]: ...

    def read_streams(self, user_ids: Sequence[int]) -> list[UserStream | None]: ...

    def put_item_sids(self, items: Sequence[ItemSids]) -> None: ...

    def claim_item_sids(self, claims: Sequence[SidClaim]) -> list[tuple[int, ...] | None]: ...

    def read_item_sids(self, item_ids: Sequence[int]) -> dict[int, ItemSids]: ...

    def close(self) -> None: ...


class NamespaceStore(StreamStore, Protocol):
    """A StreamStore that can also list and copy a whole namespace (both stores are)."""

    def entity_ids(self, join_key: str = enc.USER_ID_KEY) -> np.ndarray: ...

    def read_user_states(self, user_ids: Sequence[int]) -> list[UserState | None]: ...

    def write_user_states(self, states: Sequence[UserState]) -> None: ...


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


def _ints(value: enc.OnlineValue) -> np.ndarray:
    return np.asarray(value.int64_list_val.val, dtype=np.int64)


def decode_user_stream(user_id: int, raw: Sequence[bytes | None], n_codes: int) -> UserStream | None:
    """A user's stream from its four stored Values (``enc.STREAM_FEATURES`` order); None: no stream."""
    if raw[2] is None:  # no event_ids field: the user has no stream yet
        return None
    tok, act, eids, times = (enc.decode_value(r) for r in raw)
    return UserStream(
        user_id=int(user_id),
        tokens=_ints(tok).reshape(-1, n_codes),
        actions=_ints(act),
        event_ids=list(eids.string_list_val.val),
        event_times_ms=_ints(times),
    )


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
