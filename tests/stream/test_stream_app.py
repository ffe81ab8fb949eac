"""Worker plumbing that needs no broker: retry of transient store errors, replay order."""

from __future__ import annotations

import time
from typing import NamedTuple

import pandas as pd
import pytest
import redis

from hisam_pb.v1 import events_pb2 as pb
from stream import producer as prod
from stream.app import _process_with_retry
from stream.processing import BatchOutput


def test_transient_store_errors_are_retried_then_succeed() -> None:
    calls = []

    def flaky(batch):
        calls.append(len(batch))
        if len(calls) < 3:
            raise redis.exceptions.ConnectionError("redis restarting")
        return BatchOutput(appended=len(batch))

    assert _process_with_retry(flaky, [object()] * 4, give_up_s=5).appended == 4
    assert calls == [4, 4, 4]


def test_non_transient_errors_propagate_at_once() -> None:
    calls = []

    def broken(batch):
        calls.append(1)
        raise KeyError("a bug, not an outage")

    with pytest.raises(KeyError):
        _process_with_retry(broken, [], give_up_s=5)
    assert calls == [1]


def test_transient_errors_give_up_after_the_deadline() -> None:
    def down(batch):
        raise redis.exceptions.TimeoutError("still down")

    with pytest.raises(redis.exceptions.TimeoutError):
        _process_with_retry(down, [], give_up_s=0.3)


def test_replay_is_time_ordered_with_stable_event_ids() -> None:
    df = pd.DataFrame(
        {
            "user_idx": [3, 1, 2],
            "item_idx": [30, 10, 20],
            "rating": [5.0, 1.0, 4.0],
            "label": [1, 0, 1],
            "timestamp": [300, 100, 200],
        },
        index=[2, 0, 1],
    )
    evs = list(prod.actions_from_interactions(df, "ds"))
    assert [e.user_id for e in evs] == [1, 2, 3]
    assert [e.event_id for e in evs] == ["ds:0", "ds:1", "ds:2"]
    assert [e.action for e in evs] == [pb.ACTION_TYPE_DISLIKE, pb.ACTION_TYPE_LIKE, pb.ACTION_TYPE_LIKE]
    assert [e.event_time_ms for e in evs] == [100_000, 200_000, 300_000]


class _Batch:
    def __init__(self, k: int) -> None:
        self.records = [k]

    def __len__(self) -> int:
        return len(self.records)


async def _batches(n: int):
    for k in range(n):
        yield _Batch(k)


def test_pipeline_overlaps_processing_with_the_previous_outputs_and_keeps_their_order() -> None:
    """Batch k+1 is written while batch k's outputs are in flight; outputs start in input
    order, each after the previous batch's have ended (so at most two batches are written
    and their outputs not acknowledged)."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from stream.app import _InProcess, _pipeline

    events: list[tuple[str, int]] = []
    finishing = threading.Event()
    in_process = _InProcess()
    sizes_at_finish: list[int] = []

    def process(records):
        (k,) = records
        assert in_process.size == 1  # what an ack meanwhile counts as written and not acknowledged
        if k == 1:  # batch 0's outputs are in flight meanwhile
            assert finishing.wait(5), "batch 1 was not processed while batch 0's outputs were in flight"
        events.append(("process", k))
        return BatchOutput(appended=k)

    async def finish(batch, out, t0, t1):
        (k,) = batch.records
        events.append(("finish", k))
        sizes_at_finish.append(in_process.size)
        if k == 0:
            finishing.set()
            deadline = time.monotonic() + 5
            while ("process", 1) not in events:
                assert time.monotonic() < deadline, "batch 1 was not processed while batch 0's outputs were in flight"
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        events.append(("done", k))

    seen: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        asyncio.run(_pipeline(_batches(4), pool, process, lambda out: seen.append(out.appended), finish, in_process))
    assert seen == [0, 1, 2, 3]
    for k in range(1, 4):  # batch k's outputs start only after batch k-1's have ended
        assert events.index(("done", k - 1)) < events.index(("finish", k))
    assert events.index(("process", 1)) < events.index(("done", 0))
    assert events[-1] == ("done", 3)
    assert in_process.size == 0 and set(sizes_at_finish) <= {0, 1}


class _Exited(Exception):
    """What ``_exit_before_ack`` raises in these tests instead of ending the process."""


@pytest.fixture
def exits(monkeypatch) -> list[int]:
    codes: list[int] = []

    def record(code: int) -> None:
        codes.append(code)
        raise _Exited(code)

    monkeypatch.setattr("stream.app._exit_before_ack", record)
    return codes


class _Partition(NamedTuple):
    topic: str
    partition: int


class _Record(NamedTuple):
    offset: int
    timestamp: int


class _AckedBatch:
    """A batch of records on one partition that logs its ack."""

    def __init__(self, events: list, part: _Partition, offsets: list[int]) -> None:
        self.events, self.records = events, [_Record(o, int(time.time() * 1000) - 2000) for o in offsets]
        self.spans = [(part, offsets)]

    def __len__(self) -> int:
        return len(self.records)

    async def ack(self, pending_limit) -> None:
        self.events.append(("ack", pending_limit))


class _Sender:
    """Delivery futures acknowledged a little later, as a broker would; or a failure."""

    def __init__(self, events: list, fail: bool = False) -> None:
        self.events, self.fail = events, fail

    async def send(self, topic: str, records) -> list:
        import asyncio

        if self.fail:
            raise ConnectionError("broker gone")
        self.events.append(("send", topic, len(records)))
        futs = []
        for _ in records:
            fut = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.01, fut.set_result, None)
            fut.add_done_callback(lambda f: self.events.append(("delivered", topic)))
            futs.append(fut)
        return futs


class _App:
    def __init__(self, highwater: int) -> None:
        self.consumer = self
        self._highwater = highwater

    def highwater(self, part) -> int:
        return self._highwater


def _sample(name: str, labels: dict | None = None) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_finisher_acks_after_the_outputs_are_acknowledged_then_counts_and_observes() -> None:
    import asyncio

    from stream import topics as tp
    from stream.app import BatchFinisher, count_actions

    events: list = []
    part = _Partition(f"t-{time.monotonic_ns()}", 3)
    batch = _AckedBatch(events, part, [10, 11, 12])
    out = BatchOutput(
        samples=[(b"u", b"s")] * 2, dead_letters=[(b"k", b"d")], retries=[(b"u", b"r")], appended=2, duplicates=1
    )
    consumed, samples = _sample("hisam_stream_actions_consumed_total"), _sample("hisam_stream_samples_produced_total")
    latency = {"agent": "finisher-test"}
    n_latency = _sample("hisam_stream_batch_latency_seconds_count", latency)

    def count(n, out) -> None:
        events.append(("count", n))
        count_actions(n, out)

    retry = tp.action_retries("finisher-test")
    finish = BatchFinisher(_App(highwater=20), _Sender(events), "finisher-test", count, lambda: 7, retry)
    asyncio.run(finish(batch, out, time.perf_counter(), time.perf_counter()))

    sends = [("send", tp.TRAINING_SAMPLES, 2), ("send", retry, 1), ("send", tp.DEAD_LETTERS, 1)]
    assert events[:3] == sends
    delivered = [("delivered", tp.TRAINING_SAMPLES)] * 2 + [("delivered", t) for t in (retry, tp.DEAD_LETTERS)]
    assert sorted(events[3:7]) == sorted(delivered)
    assert events[7:] == [("ack", 7), ("count", 3)]
    assert _sample("hisam_stream_actions_consumed_total") == consumed + 3
    assert _sample("hisam_stream_samples_produced_total") == samples + 2
    assert _sample("hisam_stream_batch_latency_seconds_count", latency) == n_latency + 1
    assert _sample("hisam_stream_freshness_seconds_count", latency) == 3  # one per record
    assert _sample("hisam_stream_freshness_seconds_sum", latency) >= 3 * 2.0
    # Records behind the batch's last offset (12) up to the highwater mark (20).
    assert _sample("hisam_stream_consumer_lag_records", {"topic": part.topic, "partition": "3"}) == 7


def test_finisher_without_a_pending_limit_leaves_the_commit_to_faust() -> None:
    import asyncio

    from stream.app import BatchFinisher, count_items

    events: list = []
    batch = _AckedBatch(events, _Partition(f"t-{time.monotonic_ns()}", 0), [0])
    finish = BatchFinisher(_App(highwater=1), _Sender(events), "finisher-test-items", count_items)
    asyncio.run(finish(batch, BatchOutput(items_written=1), time.perf_counter(), time.perf_counter()))
    assert events[-1] == ("ack", None)


def test_finisher_exits_without_acking_when_the_outputs_cannot_be_produced(exits) -> None:
    import asyncio

    from stream.app import EXIT_PRODUCE_FAILED, BatchFinisher, count_actions

    events: list = []
    batch = _AckedBatch(events, _Partition("t", 0), [0])
    finish = BatchFinisher(_App(highwater=1), _Sender(events, fail=True), "finisher-test", count_actions, lambda: 7)
    with pytest.raises(_Exited):
        asyncio.run(finish(batch, BatchOutput(samples=[(b"u", b"s")]), time.perf_counter(), time.perf_counter()))
    assert exits == [EXIT_PRODUCE_FAILED]
    assert not any(e[0] == "ack" for e in events)


def test_append_fault_exits_once_the_appends_reach_the_limit(exits) -> None:
    from stream.app import EXIT_FAULT_INJECTED, AppendFault

    fault = AppendFault(600)
    fault(BatchOutput(appended=500))
    fault(BatchOutput(appended=0))
    assert exits == []
    with pytest.raises(_Exited):
        fault(BatchOutput(appended=100))
    assert exits == [EXIT_FAULT_INJECTED] and fault.appended == 600

    never = AppendFault(None)
    for _ in range(3):
        never(BatchOutput(appended=10_000))
    assert exits == [EXIT_FAULT_INJECTED] and never.appended == 30_000


def test_seen_window_limit_leaves_room_for_the_batch_in_process_and_the_next() -> None:
    from stream.app import SeenWindowLimit, _InProcess

    in_process = _InProcess()
    limit = SeenWindowLimit(seen_window=1024, batch_size=500, in_process=in_process)
    assert limit() == 1024 - 500 - 500  # none in process yet: a full one may come
    in_process.size = 200
    assert limit() == 1024 - 200 - 500


def test_create_app_builds_the_action_agent_on_a_batch_topic(tmp_path) -> None:
    from features.store import OnlineStoreConfig
    from stream import topics as tp
    from stream.app import StreamSettings, create_app
    from stream.transport import BatchTopic

    settings = StreamSettings(
        bootstrap="127.0.0.1:1",  # never connected: the app is only built
        store=OnlineStoreConfig(backend="sqlite", repo_dir=tmp_path / "repo"),
        batch_size=100,
        idle_fetch_s=0.02,
    )
    app = create_app(settings)
    assert sorted(app.agents) == ["hisam-action-retries", "hisam-actions", "hisam-deletions"]  # no tokenizer: no items
    assert list(app.agents["hisam-deletions"].channel.topics) == [tp.USER_DELETIONS]
    agent, retries = app.agents["hisam-actions"], app.agents["hisam-action-retries"]
    assert isinstance(agent.channel, BatchTopic) and list(agent.channel.topics) == [tp.USER_ACTIONS]
    assert agent.fun.__qualname__ == "create_app.<locals>.append_actions"  # faust's label in its log lines
    assert isinstance(retries.channel, BatchTopic) and list(retries.channel.topics) == [
        "hisam-stream-user-actions-retry"
    ]
    assert app.transport.Consumer.idle_fetch_s == 0.02
    assert app.conf.broker_commit_every == 100
    # Explicit, not faust's 1,200 s: a broker that stops acknowledging fails the batch (crash-only).
    assert app.conf.producer_request_timeout == 30.0 and app.conf.producer_acks == -1


def test_create_app_refuses_a_seen_window_below_two_batches(tmp_path) -> None:
    from features.store import OnlineStoreConfig
    from stream.app import StreamSettings, create_app

    store = OnlineStoreConfig(backend="sqlite", repo_dir=tmp_path / "repo", seen_window=999)
    with pytest.raises(ValueError, match="seen_window 999 < 2 x batch_size 500"):
        create_app(StreamSettings(bootstrap="127.0.0.1:1", store=store))
