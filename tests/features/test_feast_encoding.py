"""features.encoding must write exactly Feast's bytes (keys, fields, values, timestamps)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from features import encoding as enc


@pytest.fixture(scope="module")
def feast_modules():
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.helpers import _mmh3, _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Int64List, StringList, Value

    return serialize_entity_key, _mmh3, _redis_key, EntityKey, Value, Int64List, StringList


@pytest.mark.parametrize("value", [0, 7, 2**40 + 3, -5])
def test_entity_and_redis_keys_match_feast(feast_modules, value: int) -> None:
    serialize_entity_key, _, _redis_key, EntityKey, Value, _, _ = feast_modules
    ek = EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=value)])
    assert enc.entity_key_bytes("user_id", value) == serialize_entity_key(ek, entity_key_serialization_version=3)
    assert enc.redis_key("hisam", "user_id", value) == _redis_key("hisam", ek, entity_key_serialization_version=3)


def test_field_names_match_feast(feast_modules) -> None:
    _, _mmh3, *_ = feast_modules
    for feature in enc.STREAM_FEATURES:
        assert enc.redis_field(enc.USER_STREAM_FV, feature) == _mmh3(f"{enc.USER_STREAM_FV}:{feature}")
    assert enc.redis_ts_field("user_stream") == b"_ts:user_stream"


def test_values_match_feast(feast_modules) -> None:
    *_, Value, Int64List, StringList = feast_modules
    ints = [0, 1, 127, 128, 300, 1_700_000_000_123]
    assert enc.int64_list_value(ints) == Value(int64_list_val=Int64List(val=ints)).SerializeToString()
    assert enc.int64_list_value([]) == Value(int64_list_val=Int64List(val=[])).SerializeToString()
    assert enc.string_list_value(["a", "év"]) == Value(string_list_val=StringList(val=["a", "év"])).SerializeToString()
    assert enc.int64_value(42) == Value(int64_val=42).SerializeToString()
    assert enc.string_value("v1") == Value(string_val="v1").SerializeToString()
    # The packed payload the Lua script appends is protobuf's own varint encoding.
    packed = Int64List(val=ints).SerializeToString()
    assert packed.endswith(enc.varints(ints))


def test_timestamps_match_feast() -> None:
    from google.protobuf.timestamp_pb2 import Timestamp

    ms = 1_700_000_000_123
    ts = Timestamp()
    ts.FromDatetime(datetime.fromtimestamp(ms / 1000, tz=UTC))
    parsed = Timestamp.FromString(enc.timestamp_bytes(ms))
    assert (parsed.seconds, parsed.nanos // 1_000_000) == (ts.seconds, ts.nanos // 1_000_000)
    for t in (0, 5, 1000, 1_700_000_000_000, ms, -1):  # hand-written bytes = protobuf's
        s, n = divmod(t, 1000)
        assert enc.timestamp_bytes(t) == Timestamp(seconds=s, nanos=n * 1_000_000).SerializeToString(), t

    from feast.infra.online_stores import (
        sqlite as feast_sqlite,  # registers Feast's adapters
    )

    naive = datetime.fromtimestamp(ms // 1000, tz=UTC).replace(tzinfo=None)
    assert enc.sqlite_timestamp(ms) == feast_sqlite.adapt_datetime_epoch(naive)


def test_varints_reject_negative() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        enc.varints([3, -1])
