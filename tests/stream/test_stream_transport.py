"""The faust transport adaptations (stream.transport)."""

from __future__ import annotations

import asyncio
import inspect
import time
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import faust
    from faust.transport.consumer import Consumer as FaustConsumer

from stream.transport import FastDrainConsumer, hold_empty_fetches


def test_drain_loop_copy_matches_the_pinned_faust() -> None:
    # FastDrainConsumer._drain_messages is faust 0.15.3's loop with one change: a faust
    # upgrade must re-check it (pyproject pins faust-streaming==0.15.3).
    assert faust.__version__ == "0.15.3"
    src = inspect.getsource(FaustConsumer._drain_messages)
    assert "callback(message), self.suspend_flow.wait()" in src
    assert FastDrainConsumer._drain_messages is not FaustConsumer._drain_messages


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
