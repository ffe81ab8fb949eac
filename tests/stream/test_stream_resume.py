"""Deleted group offsets do not produce duplicates: a group without committed offsets resumes
after the online store's applied record (stream/resume.py), not at the earliest offset.

The processors record each batch's offsets with its appends; ``resume_from_store`` commits
record + 1 where the group has no offset (and nothing else); end to end, a second worker
under a new ``--app-id`` (no committed offsets: the same as deleted ones) on the same store
appends what comes next and nothing twice, with a small seen window (W 16) that a replay
from the earliest offset would overrun many times.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import defaultdict

import pytest

from features.store import AppliedOffset, ItemSids, OnlineStoreConfig, open_stream_store
from hisam_pb.v1 import events_pb2 as pb
from infra.kafka import Offsets, commit_offsets, consumer
from stream import producer as prod
from stream import records as rec
from stream import topics as tp
from stream.processing import ActionProcessor, RetryProcessor, UnknownItemRetry
from stream.resume import resume_from_store
from stream.testing import WorkerProcess, wait_until

pytestmark = pytest.mark.kafka

T, N_CODES = 150, 6
RUN = uuid.uuid4().hex[:8]
BASE = 9_100_000_000 + (uuid.uuid4().int % 1_000_000) * 1000  # ids unique per run
RETRY = "g-user-actions-retry"


def _tokens(item: int) -> tuple[int, ...]:
    return tuple(item % 1000 * 10 + j for j in range(N_CODES))


def _store(tmp_path, backend: str = "sqlite", redis_url: str | None = None):
    cfg = OnlineStoreConfig(
        backend=backend,
        repo_dir=tmp_path / "repo",
        redis_url=redis_url,
        project=f"t_resume_{RUN}_{backend}",
        stream_len=T,
        n_codes=N_CODES,
        seen_window=16,
    )
    store = open_stream_store(cfg)
    store.put_item_sids([ItemSids(BASE + i, _tokens(BASE + i), "v", 0) for i in range(10)])
    return store


def _offs(store, topic: str) -> dict[int, int]:
    return {p: a.offset for p, a in store.applied_offsets(topic).items()}


def _msg(offset: int, value: bytes, partition: int = 0, topic: str = tp.USER_ACTIONS) -> rec.RawMessage:
    return rec.RawMessage(topic, partition, offset, b"k", value)


def _action(k: int, user: int = 0) -> bytes:
    return rec.action_event(f"{RUN}-p{k}", BASE + user, BASE + k % 10, 1, 1_700_000_000_000 + k).SerializeToString()


def test_the_processors_record_their_batches_offsets(tmp_path) -> None:
    store = _store(tmp_path)
    proc = ActionProcessor(store, retry=UnknownItemRetry(0, 60_000))
    # Two partitions; the highest offset of each is recorded, a dead-lettered record's too.
    batch = [_msg(10, _action(0)), _msg(4, _action(1), 1), _msg(11, _action(2)), _msg(12, b"\xff garbage")]
    out = proc.process(batch)
    assert out.appended == 3 and len(out.dead_letters) == 1
    assert _offs(store, tp.USER_ACTIONS) == {0: 12, 1: 4}
    # A batch none of whose actions reaches the store records nothing.
    proc.process([_msg(13, b"\xff garbage")])
    assert _offs(store, tp.USER_ACTIONS) == {0: 12, 1: 4}
    # An action on an unknown item goes to the retry topic; its batch reached the store.
    unknown = rec.action_event(f"{RUN}-u", BASE, BASE + 999, 1, 1_700_000_000_000).SerializeToString()
    out = proc.process([_msg(14, unknown), _msg(15, _action(3))])
    assert len(out.retries) == 1 and _offs(store, tp.USER_ACTIONS) == {0: 15, 1: 4}
    # The retry agent records its own topic's offsets, never user-actions'.
    store.put_item_sids([ItemSids(BASE + 999, _tokens(BASE + 999), "v", 0)])
    env = pb.DeadLetter.FromString(out.retries[0][1])
    assert (env.topic, env.offset) == (tp.USER_ACTIONS, 14)
    retry = RetryProcessor(proc, sleep=lambda s: None)
    out = retry.process([_msg(3, out.retries[0][1], 2, RETRY)])
    assert out.appended == 1
    assert _offs(store, RETRY) == {2: 3}
    assert _offs(store, tp.USER_ACTIONS) == {0: 15, 1: 4}
    (s,) = store.read_streams([BASE])
    assert s.event_ids == [f"{RUN}-p{k}" for k in (0, 1, 2, 3)] + [f"{RUN}-u"]
    store.close()


def test_resume_commits_only_where_the_group_has_no_offset(tmp_path, own_broker, caplog) -> None:
    bootstrap = own_broker.handle.bootstrap
    specs = [tp.TopicSpec(tp.USER_ACTIONS, 4), tp.TopicSpec(RETRY, 4), tp.TopicSpec("trunc", 1)]
    tp.ensure_topics(bootstrap, specs)
    producer = prod.make_producer(bootstrap)
    ts = {
        (t, p): [producer.send(t, value=b"x", partition=p).get(30).timestamp for _ in range(5)]
        for t, p in [(tp.USER_ACTIONS, q) for q in range(4)] + [("trunc", 0)]
    }
    producer.close()
    ua = tp.USER_ACTIONS
    store = _store(tmp_path)
    store.append_batch(
        [],
        applied={
            (ua, 0): AppliedOffset(2, ts[ua, 0][2]),  # the same log: resumes at 3 - W
            (ua, 1): AppliedOffset(4, ts[ua, 1][4]),  # the group has an offset: it stands
            (ua, 2): AppliedOffset(3, ts[ua, 2][3] - 1),  # another record at that offset: recreated
            (ua, 3): AppliedOffset(9, ts[ua, 3][0] - 60_000),  # beyond the end, the log newer: recreated
            (RETRY, 3): 2,  # no timestamp, nothing to check against: resumes at 3 (beyond the end: exit 78)
            (ua, 7): 3,  # no such partition
            ("trunc", 0): AppliedOffset(7, ts["trunc", 0][4] + 60_000),  # beyond the end, nothing newer: truncated
        },
    )
    offsets = Offsets(bootstrap)
    try:
        commit_offsets(bootstrap, "g", ua, {1: 2})
        with caplog.at_level(logging.WARNING, logger="stream.resume"):
            done = resume_from_store(bootstrap, "g", store, [ua, RETRY, "trunc"], redeliver=2)
        # user-actions[0]: W (here 2) records before record + 1, re-read for their outputs
        assert done == {(ua, 0): 1, (RETRY, 3): 3, ("trunc", 0): 8}
        assert offsets.committed("g", ua) == {0: 1, 1: 2}
        assert offsets.committed("g", RETRY) == {3: 3}
        assert "resuming user-actions[0] at offset 1 from the online store's record" in caplog.text
        assert "not resuming user-actions[2] from the online store's record (offset 3)" in caplog.text
        assert "not resuming user-actions[3] from the online store's record (offset 9)" in caplog.text
        # Once it has offsets, nothing moves them; a store without a record changes nothing.
        store.append_batch([], applied={(ua, 0): 4})
        assert resume_from_store(bootstrap, "g", store, [ua, RETRY]) == {}
        empty = _store(tmp_path / "empty")
        assert resume_from_store(bootstrap, "other", empty, [ua]) == {}
        assert offsets.committed("other", ua) == {}
        empty.close()
        # A group whose members are consuming refuses an outside commit: theirs stand.
        member = consumer(bootstrap, group_id="busy", auto_offset_reset="earliest")
        member.subscribe([ua])
        wait_until(lambda: member.poll(100) is not None and member.assignment(), 30, 0, "a group member")
        assert resume_from_store(bootstrap, "busy", store, [ua]) == {}
        assert "its members are consuming" in caplog.text
        member.close()
    finally:
        offsets.close()
        store.close()


def _worker(bootstrap: str, store, app_id: str, log_path) -> WorkerProcess:
    cfg = store.config
    args = [
        "--bootstrap", bootstrap, "--backend", cfg.backend, "--repo-dir", str(cfg.repo_dir),
        "--project", cfg.project, "--stream-len", str(T), "--n-codes", str(N_CODES), "--seen-window", "16",
        "--batch-size", "8", "--within-ms", "5", "--app-id", app_id, "--instance-id", f"{app_id}-0",
    ]  # fmt: skip
    if cfg.redis_url:
        args += ["--redis-url", cfg.redis_url]
    return WorkerProcess(args, log_path)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_deleted_group_offsets_do_not_produce_duplicates(backend, tmp_path, own_broker, request) -> None:
    bootstrap = own_broker.handle.bootstrap
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else None
    store = _store(tmp_path, backend, redis_url)
    users = [BASE + 1, BASE + 2]
    evs = [
        rec.action_event(f"{RUN}-{backend}-{k}", users[k % 2], BASE + k % 10, 1 + k % 5, 1_700_000_000_000 + k)
        for k in range(220)
    ]
    want = defaultdict(list)
    for e in evs:
        want[e.user_id].append(e.event_id)

    def appended(n: int):
        return lambda: all(s is not None and len(s) >= n for s in store.read_streams(users))

    producer = prod.make_producer(bootstrap)
    first = _worker(bootstrap, store, f"resume-a-{RUN}", tmp_path / "first.log")
    second = _worker(bootstrap, store, f"resume-b-{RUN}", tmp_path / "second.log")
    try:
        first.start()
        prod.produce_actions(producer, evs[:200])
        wait_until(appended(100), 60, 0.2, f"the first 200 appends ({first.log_path})")
        first.stop()
        recorded = _offs(store, tp.USER_ACTIONS)
        assert sum(off + 1 for off in recorded.values()) == 200  # the whole log so far
        # A new group on the same store: no committed offsets, as after deleting them.
        second.start()
        prod.produce_actions(producer, evs[200:])
        wait_until(appended(110), 60, 0.2, f"the 20 new appends ({second.log_path})")
        for s in store.read_streams(users):
            assert s.event_ids == want[s.user_id], "an action appended twice, or out of order"
        log_text = second.log_path.read_text(errors="replace")
        for p, off in recorded.items():  # the last W (16) records re-read: recognised as duplicates
            line = f"resuming user-actions[{p}] at offset {max(0, off + 1 - 16)} from the online store's record"
            assert line in log_text
        assert len(re.findall(r"resuming user-actions\[", log_text)) == len(recorded)
        assert sum(off + 1 for off in _offs(store, tp.USER_ACTIONS).values()) == 220
    finally:
        producer.close()
        first.stop()
        second.stop()
        store.close()


def test_a_recreated_topic_is_read_from_its_earliest_offset(tmp_path, own_broker) -> None:
    """The store's record describes another log (a new broker, or the topic recreated): its
    offsets mean nothing there, and a new group reads the new log from its start."""
    bootstrap = own_broker.handle.bootstrap
    store = _store(tmp_path)
    old = 1_700_000_000_000  # long before anything in the new log was produced
    store.append_batch([], applied={(tp.USER_ACTIONS, p): AppliedOffset(1000 + p, old) for p in range(4)})
    user = BASE + 5
    evs = [rec.action_event(f"{RUN}-new-{k}", user, BASE + k % 10, 1, old + k) for k in range(20)]
    tp.ensure_topics(bootstrap, tp.default_topics(4))
    producer = prod.make_producer(bootstrap)
    worker = _worker(bootstrap, store, f"resume-c-{RUN}", tmp_path / "worker.log")
    try:
        prod.produce_actions(producer, evs)
        worker.start()
        want = [e.event_id for e in evs]
        wait_until(lambda: (s := store.read_streams([user])[0]) is not None and s.event_ids == want, 60, 0.2,
                   f"every action of the new log ({worker.log_path})")  # fmt: skip
        text = worker.log_path.read_text(errors="replace")
        assert "(the topic was recreated); the group starts at its earliest offset" in text
        assert len(re.findall(r"not resuming user-actions\[\d\]", text)) == 4
        assert not re.search(r"WARNING stream.resume: resuming", text)
    finally:
        producer.close()
        worker.stop()
        store.close()
