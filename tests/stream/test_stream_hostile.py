"""Hostile input against a real worker process and the session broker (SQLite online store).

A 1 MB record (0.5 MB key, 0.5 MB value) must not stop its partition: its dead letter is
bounded (so the broker takes it) and the actions after it are appended. An action sent
just before its item is not lost: it is retried until the item is there, then appended.
"""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest

from features.store import ItemSids, OnlineStoreConfig, open_stream_store
from hisam_pb.v1 import events_pb2 as pb
from stream import producer as prod
from stream import records as rec
from stream import topics as tp
from stream.testing import WorkerProcess, consume_all, wait_until

pytestmark = pytest.mark.kafka

T, N_CODES = 20, 6
RUN = uuid.uuid4().hex[:8]
BASE = 8_000_000_000 + (uuid.uuid4().int % 1_000_000) * 1000  # ids unique per run


def _tokens(item: int) -> tuple[int, ...]:
    return tuple(item % 1000 * 10 + j for j in range(N_CODES))


@pytest.fixture(scope="module")
def env(kafka_bootstrap, tmp_path_factory):
    repo = tmp_path_factory.mktemp("hostile_repo")
    cfg = OnlineStoreConfig(backend="sqlite", repo_dir=repo, stream_len=T, n_codes=N_CODES)
    store = open_stream_store(cfg)
    store.put_item_sids([ItemSids(BASE + i, _tokens(BASE + i), "v", 0) for i in range(10)])
    tp.ensure_topics(kafka_bootstrap, tp.default_topics(4))
    worker = WorkerProcess(
        [
            "--bootstrap", kafka_bootstrap, "--backend", "sqlite", "--repo-dir", str(repo),
            "--stream-len", str(T), "--n-codes", str(N_CODES), "--app-id", f"hisam-hostile-{RUN}",
            "--instance-id", f"hostile-{RUN}", "--within-ms", "5",
        ],
        repo / "worker.log",
    )  # fmt: skip
    worker.start()
    # Room for the 1 MB record (kafka-python's own limit is 1 MiB per request).
    producer = prod.make_producer(kafka_bootstrap, linger_ms=2)
    producer.config["max_request_size"] = 4 << 20
    yield {"bootstrap": kafka_bootstrap, "store": store, "worker": worker, "producer": producer}
    producer.close()
    worker.stop()
    store.close()


def _stream(store, user: int) -> list[str]:
    (s,) = store.read_streams([user])
    return [] if s is None else s.event_ids


def test_a_1mb_record_is_dead_lettered_bounded_and_the_partition_goes_on(env) -> None:
    p, worker, store = env["producer"], env["worker"], env["store"]
    key, value = b"K" * 500_000 + RUN.encode(), b"\xff" * 500_000
    user = BASE + 1
    evs = [rec.action_event(f"{RUN}-big-{k}", user, BASE + k % 10, 2, 1_700_000_000_000 + k) for k in range(20)]
    # All on one partition: the garbage first, the valid actions behind it.
    p.send(tp.USER_ACTIONS, key=key, value=value, partition=0).get(30)
    for e in evs:
        p.send(tp.USER_ACTIONS, key=rec.user_key(user), value=e.SerializeToString(), partition=0)
    p.flush()
    want = [e.event_id for e in evs]
    wait_until(lambda: _stream(store, user) == want, 60, 0.2, f"the actions behind the 1 MB record ({worker.log_path})")
    key_hash = hashlib.sha256(key).digest()
    found: list = []

    def mine(records) -> bool:
        found[:] = [r for r in records if pb.DeadLetter.FromString(r.value).key_sha256 == key_hash]
        return bool(found)

    consume_all(env["bootstrap"], tp.DEAD_LETTERS, mine, timeout_s=30)
    (r,) = found
    d = pb.DeadLetter.FromString(r.value)
    assert (d.reason, d.topic, d.partition) == (rec.DECODE_ERROR, tp.USER_ACTIONS, 0)
    assert d.raw == value[: len(d.raw)] and 0 < len(d.raw) <= 64 * 1024 and len(d.key) <= 1024
    assert (d.raw_sha256, d.raw_size, d.key_size) == (hashlib.sha256(value).digest(), len(value), len(key))
    assert len(r.value) < 80_000 and len(r.key) <= 1024  # the record on the topic, key and value, is bounded
    assert worker.alive(), worker.log_tail()


def test_an_action_sent_just_before_its_item_is_appended(env) -> None:
    p, store, worker = env["producer"], env["store"], env["worker"]
    user, item = BASE + 2, BASE + 500  # the item is unknown to the store so far
    early = rec.action_event(f"{RUN}-early", user, item, 3, 1_700_000_000_000)
    later = rec.action_event(f"{RUN}-later", user, BASE, 2, 1_700_000_000_001)
    prod.produce_actions(p, [early, later])

    def retried(records) -> bool:
        return any(pb.ActionEvent.FromString(pb.DeadLetter.FromString(r.value).raw).event_id == early.event_id
                   for r in records)  # fmt: skip

    # The worker met the action before its item: it waits on the retry topic.
    consume_all(env["bootstrap"], tp.action_retries(f"hisam-hostile-{RUN}"), retried, timeout_s=30)
    wait_until(lambda: _stream(store, user) == [later.event_id], 30, 0.1, "the later action")
    time.sleep(0.5)
    store.put_item_sids([ItemSids(item, _tokens(item), "v", 0)])  # what the item agent writes
    wait_until(
        lambda: _stream(store, user) == [later.event_id, early.event_id], 30, 0.1,
        f"the early action appended once its item is known ({worker.log_path})",
    )  # fmt: skip
    assert worker.alive(), worker.log_tail()


def test_a_dead_letter_the_broker_refuses_is_sent_again_without_its_value(env, tmp_path) -> None:
    """Through the worker's own producer (faust's aiokafka): the broker refuses a 1 MB dead
    letter (MessageSizeTooLargeError); the shrunk one is delivered, nothing is dropped."""
    import asyncio

    from stream.app import StreamSettings, create_app
    from stream.outputs import RecordSender, deliver_dead_letters

    value = RUN.encode() + b"\x00" * 1_100_000
    huge = rec.DeadLetterLimits(key_bytes=10**7, value_bytes=10**7)
    letter = rec.dead_letter(rec.RawMessage(tp.USER_ACTIONS, 1, 77, b"k", value), rec.DECODE_ERROR, "big", 5, huge)
    small = rec.dead_letter(rec.RawMessage(tp.USER_ACTIONS, 1, 78, b"k", RUN.encode()), rec.DECODE_ERROR, "ok", 5)
    settings = StreamSettings(
        bootstrap=env["bootstrap"],
        store=OnlineStoreConfig(backend="sqlite", repo_dir=tmp_path / "repo"),
        app_id=f"hostile-sender-{RUN}",
    )

    async def send() -> int:
        app = create_app(settings)
        await app.producer.start()
        try:
            sender = RecordSender(app.producer._ensure_producer)
            return await deliver_dead_letters(
                sender, [(b"k", letter.SerializeToString()), (b"k", small.SerializeToString())]
            )
        finally:
            await app.producer.stop()

    from infra.observability import STREAM_DEAD_LETTERS_DROPPED, STREAM_DEAD_LETTERS_SHRUNK

    shrunk, dropped = STREAM_DEAD_LETTERS_SHRUNK._value.get(), STREAM_DEAD_LETTERS_DROPPED._value.get()
    assert asyncio.run(send()) == 0
    assert STREAM_DEAD_LETTERS_SHRUNK._value.get() == shrunk + 1  # counted for the operator
    assert STREAM_DEAD_LETTERS_DROPPED._value.get() == dropped
    value_hash = hashlib.sha256(value).digest()
    got: dict[int, pb.DeadLetter] = {}

    def both(records) -> bool:
        for r in records:
            d = pb.DeadLetter.FromString(r.value)
            if d.raw_sha256 == value_hash or d.raw == RUN.encode():
                got[d.offset] = d
        return len(got) == 2

    consume_all(env["bootstrap"], tp.DEAD_LETTERS, both, timeout_s=30)
    assert got[77].raw == b"" and "value dropped" in got[77].detail and got[77].reason == rec.DECODE_ERROR
    assert got[78].raw == RUN.encode()


def test_a_group_positioned_outside_the_log_fails_loudly_instead_of_replaying(env, tmp_path) -> None:
    """Offsets past the end of user-actions (a truncated or recreated log): the worker must not
    reset to the earliest offset and replay the whole topic; it exits with a reason, every time."""
    from infra.kafka import OffsetAndMetadata, Offsets, TopicPartition, consumer
    from stream.transport import EXIT_OFFSET_OUT_OF_RANGE

    group, bootstrap = f"hisam-oor-{RUN}", env["bootstrap"]
    offsets = Offsets(bootstrap)
    try:
        ends = offsets.end(tp.USER_ACTIONS)
    finally:
        offsets.close()
    c = consumer(bootstrap, group_id=group)
    try:
        parts = {TopicPartition(tp.USER_ACTIONS, p): end + 1000 for p, end in ends.items()}
        c.assign(list(parts))
        c.commit({part: OffsetAndMetadata(off, "", -1) for part, off in parts.items()})
    finally:
        c.close()
    repo = tmp_path / "repo"
    worker = WorkerProcess(
        ["--bootstrap", bootstrap, "--backend", "sqlite", "--repo-dir", str(repo), "--stream-len", str(T),
         "--app-id", group, "--instance-id", f"oor-{RUN}"],
        tmp_path / "worker.log",
    )  # fmt: skip
    worker.start()
    try:
        assert worker.wait_exit(60) == EXIT_OFFSET_OUT_OF_RANGE, worker.log_tail()
    finally:
        worker.stop()
    assert "outside their partitions' logs" in worker.log_tail(20_000)
    store = open_stream_store(OnlineStoreConfig(backend="sqlite", repo_dir=repo, stream_len=T, n_codes=N_CODES))
    try:
        assert store.read_streams([BASE + 1]) == [None]  # nothing replayed into the store
    finally:
        store.close()


def test_a_worker_refuses_a_store_of_another_layout(env, tmp_path) -> None:
    """The layout guard at start-up: a worker configured with another T than the store was written
    with exits with EXIT_STORE_LAYOUT and a message naming both, before it consumes anything."""
    repo = tmp_path / "repo"
    store = open_stream_store(OnlineStoreConfig(backend="sqlite", repo_dir=repo, stream_len=T, n_codes=N_CODES))
    store.claim_layout()  # the store as a worker with T=20 left it
    store.close()
    from hisam.jobs.stream_worker import EXIT_STORE_LAYOUT

    worker = WorkerProcess(
        [
            "--bootstrap", env["bootstrap"], "--backend", "sqlite", "--repo-dir", str(repo),
            "--stream-len", str(T + 10), "--n-codes", str(N_CODES), "--app-id", f"hisam-layout-{RUN}",
            "--instance-id", f"layout-{RUN}",
        ],
        tmp_path / "worker.log",
    )  # fmt: skip
    worker.start()
    try:
        assert worker.wait_exit(120) == EXIT_STORE_LAYOUT, worker.log_tail()
        log = worker.log_tail(10**6)
        assert "cannot start" in log and str(T) in log and str(T + 10) in log, log
    finally:
        worker.stop()
