"""The faust transport adaptations (stream.transport).

The batch path and the fetch loop lean on faust internals (its offset bookkeeping, its
rebalance wait, how its stream iterator passes a channel's values on): these tests pin the
faust code they copy or rely on, and exercise the batch buffer and the bulk ack against a
real faust app (no broker needed for them; the worker tests run the whole path).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import time
import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import faust
    import faust._cython.streams
    from aiokafka.structs import ConsumerRecord, TopicPartition
    from faust.channels import Channel
    from faust.topics import Topic
    from faust.transport.consumer import Consumer as FaustConsumer

from stream.transport import FastDrainConsumer, RecordBatch, batch_topic, fast_transport, hold_empty_fetches

# sha256 (first 16 hex digits) of the faust-streaming 0.15.3 code that stream/transport.py
# copies (the fetch loop) or relies on (the rest). A faust upgrade must re-check the batch
# path against the new code, then update these (pyproject pins faust-streaming==0.15.3).
PINNED_FAUST_SOURCES = {
    "Consumer._drain_messages": (FaustConsumer._drain_messages, "44a2500309e83c63"),  # copied
    "Consumer.getmany": (FaustConsumer.getmany, "4b168d84882a70d6"),  # copied
    "Consumer._wait_next_records": (FaustConsumer._wait_next_records, "6218e1969a636b3f"),
    "Consumer.ack": (FaustConsumer.ack, "5fcf41cf45153475"),  # what ack_batch does in bulk
    "Consumer._new_offset": (FaustConsumer._new_offset, "1d2c7ea89a7ad4f1"),  # reads _acked
    "Consumer._add_gap": (FaustConsumer._add_gap, "4df2573ded7c1c2c"),
    "Consumer.wait_empty": (FaustConsumer.wait_empty, "e4662fe24f094819"),  # waits for _InFlight
    "Consumer._clean_unacked_messages": (FaustConsumer._clean_unacked_messages, "11be2587e71c9162"),
    "Consumer.perform_seek": (FaustConsumer.perform_seek, "0e8c130ff4b0afd8"),
    "Topic.__aiter__": (Topic.__aiter__, "838623ae001ec5d1"),  # subscribes the agent's clone
    "Topic._clone_args": (Topic._clone_args, "3b27dccaa673fe39"),  # BatchTopic adds its buffer
    "Channel.clone": (Channel.clone, "8252a0ce722d607e"),
}
# The Cython stream iterator: a channel value that is not an Event goes to the agent as is.
PINNED_STREAMS_PYX = "0041622f4a251188"


def test_the_faust_code_the_transport_copies_or_relies_on_is_the_pinned_one() -> None:
    assert faust.__version__ == "0.15.3"
    changed = [
        name
        for name, (fn, digest) in PINNED_FAUST_SOURCES.items()
        if hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16] != digest
    ]
    assert not changed, f"faust changed under stream/transport.py: re-check {changed}"
    pyx = Path(faust._cython.streams.__file__).with_name("streams.pyx").read_bytes()
    assert hashlib.sha256(pyx).hexdigest()[:16] == PINNED_STREAMS_PYX
    assert FastDrainConsumer._drain_messages is not FaustConsumer._drain_messages


# ---- the batch buffer and the bulk ack, on a real faust app (not started) ------------------


def _app(batch_size: int, within_s: float, max_records: int | None = None):
    app = faust.App(f"t-{time.monotonic_ns()}", broker="kafka://127.0.0.1:9", web_enabled=False)
    app.transport = fast_transport(app, 0.005)
    topic = batch_topic(app, "user-actions", batch_size, within_s, max_records)
    app.flow_control.resume()  # a worker resumes the flow once its partitions are assigned
    return app, topic


def _records(partition: int, offsets: range) -> list[ConsumerRecord]:
    return [ConsumerRecord("user-actions", partition, o, 0, 0, b"k", b"v%d" % o, None, 1, 2, ()) for o in offsets]


TP0, TP1 = TopicPartition("user-actions", 0), TopicPartition("user-actions", 1)


def test_batches_fill_to_the_batch_size_in_fetch_order_and_a_full_one_goes_at_once() -> None:
    async def main():
        _, topic = _app(batch_size=4, within_s=10.0)
        b = topic.batches
        b.add(TP0, _records(0, range(3)), generation=0)
        b.add(TP1, _records(1, range(10, 13)), generation=0)
        first = await asyncio.wait_for(b.next(), 1)  # full: no wait for within_s
        assert [(r.partition, r.offset) for r in first.records] == [(0, 0), (0, 1), (0, 2), (1, 10)]
        assert [(tp.partition, offs) for tp, offs in first.spans] == [(0, [0, 1, 2]), (1, [10])]
        assert len(b) == 2
        with pytest.raises(asyncio.TimeoutError):  # 2 records, 10 s to wait for more
            await asyncio.wait_for(b.next(), 0.2)

    asyncio.run(main())


def test_a_partial_batch_goes_when_its_oldest_record_has_waited_within_s() -> None:
    async def main():
        _, topic = _app(batch_size=500, within_s=0.05)
        b = topic.batches
        t0 = time.monotonic()
        b.add(TP0, _records(0, range(5)), generation=0)
        await asyncio.sleep(0.03)
        b.add(TP0, _records(0, range(5, 8)), generation=0)  # joins the batch; its age is the first's
        batch = await asyncio.wait_for(b.next(), 1)  # never full: goes by age, not size
        waited = time.monotonic() - t0
        assert len(batch) == 8 and waited >= 0.045, waited
        b.add(TP0, _records(0, range(8, 9)), generation=0)  # a new batch: the taken one is sealed
        assert len(batch) == 8

    asyncio.run(main())


def test_batches_of_an_old_generation_are_dropped_and_never_acked() -> None:
    async def main():
        app, topic = _app(batch_size=3, within_s=0.0)
        b = topic.batches
        b.add(TP0, _records(0, range(3)), generation=0)
        app.consumer_generation_id = 1  # a rebalance: faust seeks back to the committed offsets
        b.add(TP0, _records(0, range(3)), generation=1)
        batch = await asyncio.wait_for(b.next(), 1)
        assert batch.generation == 1 and len(b) == 0
        app.consumer_generation_id = 2  # another rebalance while the agent works on it
        await batch.ack()
        assert not app.consumer._acked[TP0] and not app.consumer._unacked_messages

    asyncio.run(main())


def test_the_fetch_loop_waits_for_room_beyond_max_records() -> None:
    async def main():
        _, topic = _app(batch_size=2, within_s=0.0, max_records=4)
        b = topic.batches
        b.add(TP0, _records(0, range(4)), generation=0)
        assert not b.has_room()
        waiter = asyncio.ensure_future(b.wait_room())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await asyncio.wait_for(b.next(), 1)
        await asyncio.wait_for(waiter, 1)
        assert b.has_room()

    asyncio.run(main())


def test_ack_marks_every_offset_in_fausts_bookkeeping_and_releases_the_rebalance_wait() -> None:
    async def main():
        app, topic = _app(batch_size=10, within_s=0.0)
        b, consumer = topic.batches, app.consumer
        consumer._committed_offset[TP1] = 12  # committed before: offsets below are not acked again
        commits = []

        async def commit():  # faust's commit, against a broker: what it does to the bookkeeping
            commits.append({tp: list(offsets) for tp, offsets in consumer._acked.items()})
            if len(commits) == 1:
                return False  # another commit was running: faust waited for it and committed nothing
            for tp in (TP0, TP1):
                consumer._committed_offset[tp] = consumer._new_offset(tp)  # faust's own computation
            return True

        consumer.commit = commit
        consumer.assignment = lambda: {TP0, TP1}
        consumer._commit_every = 6  # the app sets it to its batch size
        b.add(TP0, _records(0, range(100, 104)), generation=0)
        b.add(TP1, _records(1, range(10, 14)), generation=0)
        batch = await asyncio.wait_for(b.next(), 1)
        assert isinstance(batch, RecordBatch)
        assert len(consumer._unacked_messages) == 1  # a rebalance waits for this batch (wait_empty)
        await batch.ack()
        assert not consumer._unacked_messages
        assert commits[0] == {TP0: [100, 101, 102, 103], TP1: [12, 13]}  # acked before the commit
        # Committed before ack() returned, though the first commit call committed nothing.
        assert len(commits) == 2 and consumer._committed_offset == {TP0: 104, TP1: 14}
        await batch.ack()  # a second ack changes nothing
        assert len(commits) == 2
        b.add(TP0, _records(0, range(104, 109)), generation=0)
        small = await asyncio.wait_for(b.next(), 1)
        await small.ack()  # 5 acks pending, fewer than commit_every: left for a later ack (or faust's timer)
        assert len(commits) == 2 and consumer._acked[TP0][-1] == 108 and consumer._committed_offset[TP0] == 104

    asyncio.run(main())


def test_an_agents_stream_over_a_batch_topic_yields_record_batches() -> None:
    async def main():
        app, topic = _app(batch_size=2, within_s=0.0)
        stream = app.stream(topic)  # what @app.agent(topic) gives the agent function
        topic.batches.add(TP0, _records(0, range(2)), generation=0)
        async for batch in stream:  # faust's own (Cython) stream iterator
            assert isinstance(batch, RecordBatch) and [r.offset for r in batch.records] == [0, 1]
            break
        assert any(isinstance(t, Topic) and t.batches is topic.batches for t in app.topics)  # subscribed
        await stream.stop()

    asyncio.run(main())


class _FakeFetcher:
    def __init__(self, results):
        self.results = list(results)

    async def _proc_fetch_request(self, assignment, node_id, request):
        return self.results.pop(0)


def test_empty_fetches_are_held_and_fetches_with_records_are_not() -> None:
    fetcher = _FakeFetcher([False, True])
    hold_empty_fetches(fetcher, idle_s=0.05)

    async def timed():
        t0 = time.perf_counter()
        got = await fetcher._proc_fetch_request(None, 0, None)
        return got, time.perf_counter() - t0

    got, empty_s = asyncio.run(timed())
    assert got is False and empty_s >= 0.045
    got, full_s = asyncio.run(timed())
    assert got is True and full_s < 0.04


def test_a_held_fetch_ends_quietly_when_cancelled() -> None:
    # aiokafka's Fetcher.close() cancels its fetch tasks and awaits them: a
    # CancelledError escaping the pause would abort the consumer's shutdown.
    fetcher = _FakeFetcher([False])
    hold_empty_fetches(fetcher, idle_s=10.0)

    async def main():
        task = asyncio.ensure_future(fetcher._proc_fetch_request(None, 0, None))
        await asyncio.sleep(0.01)
        task.cancel()
        return await task

    assert asyncio.run(main()) is False
