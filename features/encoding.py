"""Feast's online-store byte layout, reproduced without importing feast.

The stream writes user streams and item semantic IDs straight into Feast's own online
tables (Feast has no atomic append), and serving may read them back directly; both must
produce exactly the bytes Feast 0.67 writes and reads, so that ``get_online_features``
sees them. This module is that contract, in one place, checked byte for byte against
Feast's functions by tests/features/test_feast_encoding.py. It imports only protobuf and mmh3
(``import feast`` costs ~5 s).

Layout (feast/infra/key_encoding_utils.py, feast/infra/online_stores/{redis,sqlite}.py):

* entity key (serialisation version 3, one join key):
  ``<I n_keys=1> <I ValueType.STRING=2> <I len(name)> name <I ValueType.INT64=4> <I 8> <q value>``
* Redis: one hash per entity, key = entity key bytes + project (utf-8). Each feature of
  view ``fv`` is a hash field named by the 4 little-endian bytes of
  ``mmh3_32_unsigned(f"{fv}:{feature}")``; its value is a serialised ``feast.types.Value``.
  The view's event time is field ``_ts:{fv}``, a serialised ``google.protobuf.Timestamp``.
* SQLite: table ``{project}_{fv}`` with one row per (entity_key, feature_name) holding the
  serialised Value in ``value`` and the event time in ``event_ts`` (integer epoch seconds:
  Feast registers its own sqlite3 adapter and ``timestamp`` converter).

``hisam.pb.v1.OnlineValue`` is a wire-compatible subset of ``feast.types.Value``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import mmh3
from google.protobuf.timestamp_pb2 import Timestamp

from hisam_pb.v1.online_value_pb2 import OnlineInt64List, OnlineStringList, OnlineValue

DEFAULT_PROJECT = "hisam"
USER_ID_KEY = "user_id"
ITEM_ID_KEY = "item_id"

USER_STREAM_FV = "user_stream"
USER_PROFILE_FV = "user_profile"
ITEM_SID_FV = "item_sid"

STREAM_FEATURES = ("sid_tokens", "actions", "event_ids", "event_times_ms")
PROFILE_FEATURES = ("n_actions", "last_action_ms")
ITEM_FEATURES = ("sid_tokens", "tokenizer_version")

_VALUE_TYPE_STRING = 2  # feast.types.ValueType.STRING
_VALUE_TYPE_INT64 = 4  # feast.types.ValueType.INT64
ENTITY_KEY_SERIALIZATION_VERSION = 3

# Tags of the Value oneof fields (field number << 3 | wire type 2), for the Lua writer.
TAG_STRING_LIST = (12 << 3) | 2  # 98
TAG_INT64_LIST = (14 << 3) | 2  # 114
TAG_INT64 = (4 << 3) | 0  # 32


def entity_key_bytes(join_key: str, value: int) -> bytes:
    """Feast's ``serialize_entity_key`` (version 3) for one int64 join key."""
    name = join_key.encode("utf-8")
    return b"".join(
        (
            struct.pack("<I", 1),
            struct.pack("<I", _VALUE_TYPE_STRING),
            struct.pack("<I", len(name)),
            name,
            struct.pack("<I", _VALUE_TYPE_INT64),
            struct.pack("<I", 8),
            struct.pack("<q", int(value)),
        )
    )


def redis_key(project: str, join_key: str, value: int) -> bytes:
    """Feast's Redis hash key for an entity (``_redis_key``)."""
    return entity_key_bytes(join_key, value) + project.encode("utf-8")


def redis_field(feature_view: str, feature: str) -> bytes:
    """Feast's Redis hash field for a feature (``_mmh3``: murmur3-32, little-endian)."""
    return struct.pack("<I", mmh3.hash(f"{feature_view}:{feature}", signed=False))


def redis_ts_field(feature_view: str) -> bytes:
    """Feast's Redis hash field holding a view's event timestamp."""
    return f"_ts:{feature_view}".encode()


def sqlite_table(project: str, feature_view: str) -> str:
    """Feast's SQLite online table for a view (``compute_table_id`` without versioning)."""
    return f"{project}_{feature_view}"


def int64_list_value(values: Iterable[int]) -> bytes:
    return OnlineValue(int64_list_val=OnlineInt64List(val=values)).SerializeToString()


def string_list_value(values: Iterable[str]) -> bytes:
    return OnlineValue(string_list_val=OnlineStringList(val=values)).SerializeToString()


def int64_value(value: int) -> bytes:
    return OnlineValue(int64_val=int(value)).SerializeToString()


def string_value(value: str) -> bytes:
    return OnlineValue(string_val=value).SerializeToString()


def decode_value(raw: bytes | None) -> OnlineValue:
    """Parse a stored Value; an absent field parses as an empty (null) value, as in Feast."""
    v = OnlineValue()
    if raw:
        v.ParseFromString(raw)
    return v


def timestamp_bytes(event_time_ms: int) -> bytes:
    """Serialised ``google.protobuf.Timestamp`` for an epoch-ms time (Redis ``_ts`` field).

    Written by hand (field 1 seconds, field 2 nanos, varints; zero fields omitted, as
    protobuf does): it runs once per appended action, and building the message costs more.
    """
    ms = int(event_time_ms)
    if ms < 0:
        return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000).SerializeToString()
    seconds, nanos = divmod(ms, 1000)
    out = b"\x08" + varint(seconds) if seconds else b""
    return out + b"\x10" + varint(nanos * 1_000_000) if nanos else out


def sqlite_timestamp(event_time_ms: int) -> int:
    """Feast's SQLite ``event_ts`` value: epoch seconds as Feast 0.67 adapts datetimes.

    Feast registers ``adapt_datetime_epoch`` (``int(naive_utc.timestamp())``) and parses
    the column back with ``datetime.fromtimestamp(int(val))``; mirrored exactly here,
    including the naive-datetime step, so a mixed Feast/hisam table reads consistently.
    """
    dt = datetime.fromtimestamp(int(event_time_ms) // 1000, tz=UTC).replace(tzinfo=None)
    return int(dt.timestamp())


def varint(n: int) -> bytes:
    """One protobuf varint (``varints`` of one value, faster); a negative int64 is written as
    its 64-bit two's complement, as protobuf writes it. Shared by the hot paths that build
    protobuf bytes by hand (features/store/, stream/records.py)."""
    if n < 0:
        n += 1 << 64
    if n < 0x80:
        return VARINT_BYTES[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


VARINT_BYTES = [bytes((i,)) for i in range(0x80)]  # the one-byte varints (and one-byte tags)


def varints(values: Sequence[int]) -> bytes:
    """Protobuf varints of non-negative ints, concatenated (a packed repeated int64 payload)."""
    out = bytearray()
    for v in values:
        v = int(v)
        if v < 0:
            raise ValueError(f"only non-negative values are appended to streams, got {v}")
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def unpack_varints(packed: bytes) -> list[int]:
    """The ints of a packed repeated-int payload (the inverse of ``varints``), by protobuf's parser."""
    if not packed:
        return []
    return list(OnlineInt64List.FromString(b"\x0a" + varints((len(packed),)) + packed).val)
