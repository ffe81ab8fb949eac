"""Worker plumbing that needs no broker: retry of transient store errors, replay order."""

from __future__ import annotations

import time

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
