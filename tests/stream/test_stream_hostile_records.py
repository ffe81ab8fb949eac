"""Hostile input, unit level: bounded dead letters, early refusals, refused appends, and the
retry of actions that come before their item (real SQLite store, no broker)."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from features import encoding as enc
from features.store import ItemSids, OnlineStoreConfig, open_stream_store
from features.store import records as store_records
from hisam_pb.v1 import events_pb2 as pb
from stream import records as rec
from stream.processing import ActionProcessor, RetryProcessor, UnknownItemRetry

NOW = 1_750_000_000_000
HOUR = 3_600_000


def _msg(value: bytes, offset: int = 0, key: bytes = b"k", partition: int = 0) -> rec.RawMessage:
    return rec.RawMessage("user-actions", partition, offset, key, value)


def _action(event_id: str, user: int, item: int, t: int = NOW) -> bytes:
    return rec.action_event(event_id, user, item, pb.ACTION_TYPE_CLICK, t).SerializeToString()


def test_a_dead_letter_is_bounded_and_identifies_what_it_cut() -> None:
    key, value = b"K" * 500_000, b"\xff" * 500_000
    d = rec.dead_letter(rec.RawMessage("user-actions", 3, 42, key, value), rec.DECODE_ERROR, "x" * 5000, NOW)
    limits = rec.DeadLetterLimits()
    assert (d.topic, d.partition, d.offset, d.reason, d.error_time_ms) == ("user-actions", 3, 42, rec.DECODE_ERROR, NOW)
    assert d.key == key[: limits.key_bytes] and d.raw == value[: limits.value_bytes]
    assert len(d.detail) == limits.detail_chars and d.detail.endswith("...")
    assert (d.key_size, d.key_sha256) == (500_000, hashlib.sha256(key).digest())
    assert (d.raw_size, d.raw_sha256) == (500_000, hashlib.sha256(value).digest())
    assert len(d.SerializeToString()) < limits.value_bytes + limits.key_bytes + 2 * limits.detail_chars
    # Small records travel whole.
    small = rec.dead_letter(_msg(b"abc", key=b"7"), rec.DECODE_ERROR, "bad", NOW)
    assert (small.key, small.raw, small.detail, small.key_size, small.raw_size) == (b"7", b"abc", "bad", 1, 3)
    assert small.raw_sha256 == hashlib.sha256(b"abc").digest()


def test_a_refused_dead_letter_shrinks_to_its_coordinates_reason_and_hashes() -> None:
    d = rec.dead_letter(_msg(b"v" * 60_000, 9, key=b"k" * 900), rec.DECODE_ERROR, "y" * 900, NOW)
    key, value = rec.shrink_dead_letter(d.SerializeToString())
    small = pb.DeadLetter.FromString(value)
    assert key == small.key == b"k" * 64 and small.raw == b""
    assert (small.topic, small.offset, small.reason) == ("user-actions", 9, rec.DECODE_ERROR)
    assert small.raw_sha256 == hashlib.sha256(b"v" * 60_000).digest() and small.raw_size == 60_000
    assert "value dropped" in small.detail and len(small.detail) <= rec.MINIMAL_DEAD_LETTER.detail_chars
    assert len(value) < 1024


@pytest.mark.parametrize(
    ("event_id", "ok"),
    [
        ("e" * store_records.MAX_EVENT_ID_BYTES, True),
        ("e" * (store_records.MAX_EVENT_ID_BYTES + 1), False),
        ("\U0001f600" * 64, True),  # 256 bytes in UTF-8
        ("\U0001f600" * 65, False),  # 65 characters, 260 bytes
        ("e" * 100_000, False),
    ],
)
def test_an_event_id_over_the_stores_limit_is_refused_at_decode(event_id: str, ok: bool) -> None:
    raw = _action(event_id, 1, 2)
    if ok:
        assert rec.decode_action(raw).event_id == event_id
    else:
        with pytest.raises(rec.EventRejected) as e:
            rec.decode_action(raw)
        assert e.value.reason == rec.INVALID_FIELD and "longer than 256 bytes" in e.value.detail


@pytest.mark.parametrize(
    ("event_time", "bounds", "ok"),
    [
        (NOW + HOUR, rec.EventTimeBounds(), True),
        (NOW + HOUR + 1, rec.EventTimeBounds(), False),
        (874_965_758_000, rec.EventTimeBounds(), True),  # ML-100K's first rating (1997): replays keep their times
        (NOW - 30 * 24 * HOUR, rec.EventTimeBounds(max_past_ms=30 * 24 * HOUR), True),
        (NOW - 30 * 24 * HOUR - 1, rec.EventTimeBounds(max_past_ms=30 * 24 * HOUR), False),
        (NOW + 10 * HOUR, rec.EventTimeBounds(max_future_ms=None), True),
        (NOW + 10 * HOUR, None, True),
    ],
)
def test_event_times_outside_the_bounds_are_refused(event_time: int, bounds, ok: bool) -> None:
    raw = _action("e", 1, 2, event_time)
    if ok:
        assert rec.decode_action(raw, bounds, now_ms=NOW).event_time_ms == event_time
    else:
        with pytest.raises(rec.EventRejected) as e:
            rec.decode_action(raw, bounds, now_ms=NOW)
        assert e.value.reason == rec.EVENT_TIME_OUT_OF_RANGE


def test_reason_constants_match_the_store() -> None:
    assert rec.CORRUPT_USER_STATE == store_records.CORRUPT_USER_STATE == "corrupt_user_state"


@pytest.fixture
def store(tmp_path):
    s = open_stream_store(OnlineStoreConfig(backend="sqlite", repo_dir=tmp_path, stream_len=5, n_codes=6))
    s.put_item_sids([ItemSids(i, tuple(range(i * 10, i * 10 + 6)), "v1", 0) for i in (1, 2)])
    yield s
    s.close()


def _letters(out) -> dict[int, pb.DeadLetter]:
    return {d.offset: d for d in (pb.DeadLetter.FromString(v) for _, v in out.dead_letters)}


def test_the_processor_refuses_early_and_one_long_event_id_does_not_split_the_batch(store) -> None:
    batch = [
        _msg(_action("a", 7, 1), 0),
        _msg(_action("x" * 300, 7, 1), 1),
        _msg(_action("b", 7, 2, NOW + 2 * HOUR), 2),
        _msg(_action("c", 8, 2), 3),
    ]
    out = ActionProcessor(store, times=rec.EventTimeBounds()).process(batch, now=NOW)
    assert {o: d.reason for o, d in _letters(out).items()} == {1: rec.INVALID_FIELD, 2: rec.EVENT_TIME_OUT_OF_RANGE}
    assert out.appended == 2 and [s.event_ids for s in store.read_streams([7, 8])] == [["a"], ["c"]]


def _corrupt_user(store, user_id: int) -> None:
    """Overwrite the user's stored token list with bytes that are no Feast value."""
    cfg = store.config
    table = enc.sqlite_table(cfg.project, enc.USER_STREAM_FV)
    with sqlite3.connect(str(cfg.sqlite_db)) as conn:
        n = conn.execute(
            f'UPDATE "{table}" SET value = ? WHERE entity_key = ? AND feature_name = ?',
            (b"\xff\xfe not a value", enc.entity_key_bytes(enc.USER_ID_KEY, user_id), "sid_tokens"),
        ).rowcount
    assert n == 1


def test_an_action_of_a_user_with_corrupt_state_is_dead_lettered_without_a_sample(store) -> None:
    proc = ActionProcessor(store)
    proc.process([_msg(_action("a", 7, 1), 0), _msg(_action("b", 8, 1), 1)])
    _corrupt_user(store, 7)
    out = proc.process([_msg(_action("c", 7, 2), 2), _msg(_action("d", 8, 2), 3)])
    (d,) = out.dead_letters
    letter = pb.DeadLetter.FromString(d[1])
    assert (letter.reason, letter.offset) == (rec.CORRUPT_USER_STATE, 2) and letter.detail
    assert [pb.TrainingSample.FromString(v).event_id for _, v in out.samples] == ["d"]
    assert out.appended == 1 and store.read_streams([8])[0].event_ids == ["b", "d"]


def test_an_action_before_its_item_is_retried_then_appended(store) -> None:
    retry = UnknownItemRetry(delay_ms=1_000, max_age_ms=10_000)
    proc = ActionProcessor(store, retry=retry)
    out = proc.process([_msg(_action("a", 7, 3), 5, key=b"7"), _msg(_action("b", 7, 1), 6, key=b"7")], now=NOW)
    assert out.dead_letters == [] and out.appended == 1 and len(out.retries) == 1
    key, value = out.retries[0]
    env = pb.DeadLetter.FromString(value)
    assert key == b"7" and (env.topic, env.partition, env.offset, env.error_time_ms) == ("user-actions", 0, 5, NOW)
    # Not due yet and the item still unknown: retried again, nothing appended.
    slept: list[float] = []
    retries = RetryProcessor(proc, sleep=slept.append, clock=lambda: NOW + 500)
    retried = rec.RawMessage("user-actions-retry", 0, 0, key, value)
    out2 = retries.process([retried])
    assert len(out2.retries) == 1 and out2.appended == 0 and out2.dead_letters == []
    # The item arrives: the retry appends the action (after the later one: append order).
    store.put_item_sids([ItemSids(3, tuple(range(30, 36)), "v1", 0)])
    out3 = retries.process([retried])
    assert (out3.appended, out3.retries, out3.dead_letters) == (1, [], [])
    assert [pb.TrainingSample.FromString(v).event_id for _, v in out3.samples] == ["a"]
    assert store.read_streams([7])[0].event_ids == ["b", "a"]
    assert slept == [0.5, 0.5]  # due 1 s after the retry was produced (its time: when first seen here)


def test_an_action_whose_item_never_comes_is_dead_lettered_after_the_max_age(store) -> None:
    proc = ActionProcessor(store, retry=UnknownItemRetry(delay_ms=0, max_age_ms=10_000))
    out = proc.process([_msg(_action("a", 7, 99, NOW), 5, key=b"u7")], now=NOW - 10_001)
    retried = rec.RawMessage("user-actions-retry", 1, 0, *out.retries[0])
    retries = RetryProcessor(proc, clock=lambda: NOW)
    out2 = retries.process([retried, rec.RawMessage("user-actions-retry", 1, 1, b"", b"\xff")])
    letters = _letters(out2)
    assert letters[5].reason == rec.UNKNOWN_ITEM and "retries" in letters[5].detail
    assert (letters[5].topic, letters[5].key, letters[5].raw) == ("user-actions", b"u7", _action("a", 7, 99, NOW))
    assert letters[1].reason == rec.DECODE_ERROR and letters[1].topic == "user-actions-retry"
    assert out2.retries == [] and store.read_streams([7]) == [None]


def test_without_a_retry_an_unknown_item_is_dead_lettered_at_once(store) -> None:
    out = ActionProcessor(store).process([_msg(_action("a", 7, 99), 5)])
    assert [d.reason for d in _letters(out).values()] == [rec.UNKNOWN_ITEM] and out.retries == []


def test_a_retry_record_is_bounded_however_large_the_action(store) -> None:
    ev = pb.ActionEvent.FromString(_action("a", 7, 99))
    big = ev.SerializeToString() + enc.VARINT_BYTES[(15 << 3) | 2] + enc.varint(200_000) + b"u" * 200_000
    assert pb.ActionEvent.FromString(big).event_id == "a"  # an unknown field: decodes fine
    out = ActionProcessor(store, retry=UnknownItemRetry()).process([_msg(big, 1, key=b"k" * 300_000)], now=NOW)
    (key, value) = out.retries[0]
    env = pb.DeadLetter.FromString(value)
    assert key == b"7" and len(value) < 2_000 and pb.ActionEvent.FromString(env.raw) == ev


class _SizeLimitedBroker:
    """A sender that refuses records over ``limit`` bytes as a broker does (MessageSizeTooLargeError)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.delivered = limit, []

    async def send(self, topic: str, records) -> list:
        import asyncio

        from aiokafka.errors import MessageSizeTooLargeError

        futs = []
        for key, value in records:
            fut = asyncio.get_running_loop().create_future()
            if len(key) + len(value) > self.limit:
                fut.set_exception(MessageSizeTooLargeError())
            else:
                self.delivered.append((topic, key, value))
                fut.set_result(None)
            futs.append(fut)
        return futs


@pytest.mark.parametrize("dropped", [0, 1])
def test_dead_letters_refused_for_their_size_are_shrunk_once_then_dropped(dropped: int) -> None:
    import asyncio

    from stream.outputs import deliver_dead_letters

    huge = rec.DeadLetterLimits(value_bytes=10**6)
    big = rec.dead_letter(_msg(b"v" * 200_000, 1), rec.DECODE_ERROR, "big", NOW, huge)
    small = rec.dead_letter(_msg(b"v", 2), rec.DECODE_ERROR, "small", NOW)
    letters = [(big.key, big.SerializeToString()), (small.key, small.SerializeToString())]
    # Dropped: the broker takes nothing larger than the small one (the shrunk big one is larger).
    broker = _SizeLimitedBroker(len(letters[1][1]) + 1 if dropped else 100_000)
    assert asyncio.run(deliver_dead_letters(broker, letters)) == dropped
    got = {pb.DeadLetter.FromString(v).offset: pb.DeadLetter.FromString(v) for _, _, v in broker.delivered}
    assert got[2].raw == b"v"
    if dropped:
        assert 1 not in got
    else:
        assert got[1].raw == b"" and "value dropped" in got[1].detail
