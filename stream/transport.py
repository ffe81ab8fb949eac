"""faust's aiokafka transport with two per-message costs removed (profiled in app.py's docstring).

The stream worker is bound by one Python thread (the GIL): every microsecond faust spends
per record is a microsecond not spent appending. Two costs dominated a profile of a
worker draining a backlog, and neither buys anything for this app:

* **Empty fetches.** A Kafka broker holds a fetch until data arrives or ``fetch.max.wait.ms``
  passes; the embedded broker (noida-db) answers at once with nothing, so aiokafka's
  fetcher spins: measured 4,500 empty fetches/s and 94% of a core for one idle consumer,
  and in the worker 16,400 fetches (all but one empty) for a 40,000-record backlog, the
  consumer thread taking ~30% of the core from the agent. ``hold_empty_fetches`` emulates
  the broker's wait on the client: after a fetch that brought nothing, the next fetch to
  that broker waits ``idle_s``. A fetch that brought records is followed at once.
* **A race of four tasks per record.** faust's fetch loop (``Consumer._drain_messages``)
  hands each record to the conductor with ``wait_first(callback(message),
  suspend_flow.wait())``: four tasks, an ``asyncio.wait`` and three cancellations per
  record, so that a rebalance can interrupt a delivery blocked on a suspended flow. While
  the flow is active the delivery never blocks (flow control passes, faust's own send
  buffer is unused here, and the channel put is ``put_nowait``), so ``FastDrainConsumer``
  awaits it directly and races only when the flow is suspended. Measured on an agent
  that does nothing: 145 -> 48 us of CPU per record, 7,300 -> 22,000 records/s.

The fetch loop below is faust-streaming 0.15.3's ``Consumer._drain_messages`` with that one
change; faust is pinned in pyproject.toml, and tests/stream/test_stream_transport.py fails
when faust's loop changes under it.
"""

from __future__ import annotations

import asyncio
import logging

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger(__name__)


def hold_empty_fetches(fetcher, idle_s: float) -> None:
    """Make an empty fetch response cost ``idle_s`` before the next fetch to that broker.

    ``fetcher`` is aiokafka's ``Fetcher``: its fetch routine starts one
    ``_proc_fetch_request`` task per broker and sends no new fetch to a broker while one is
    in flight, so a pause inside the task paces that broker's fetches. The task returns
    True when records (or an error to raise) were buffered: then there is no pause.
    Cancelled during the pause, it returns False as the wrapped task does when cancelled.
    """
    proc = fetcher._proc_fetch_request

    async def proc_then_hold(assignment, node_id, request):
        got = await proc(assignment, node_id, request)
        if not got:
            try:
                await asyncio.sleep(idle_s)
            except asyncio.CancelledError:
                # Like the wrapped task: on close or unassignment the fetcher cancels its
                # fetch tasks and awaits them, expecting them to end quietly.
                return False
        return got

    fetcher._proc_fetch_request = proc_then_hold


class FastDrainConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer: direct delivery while the flow is active, held empty fetches."""

    idle_fetch_s: float = 0.005

    def _new_consumer_thread(self):
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - runs in every worker test
        # faust-streaming 0.15.3 Consumer._drain_messages; the only change is marked.
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        flow_control_active = self.app.flow_control.is_active

        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for

        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                ait = getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0

                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset:
                                if acks_enabled_for(message.topic):
                                    await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None:
                                if self._n_acked >= commit_every:
                                    self._n_acked = 0
                                    await self.commit()
                            # -- changed: faust always races the delivery against a flow
                            # suspension (wait_first). With the flow active the delivery
                            # cannot block, and nothing can suspend the flow before it
                            # returns (suspension runs in another task of this loop).
                            if self.flow_active and flow_control_active():
                                await callback(message)
                            else:
                                await self.wait_first(callback(message), self.suspend_flow.wait())
                            # -- end of change
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key, message.value)
                    unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def on_start(self) -> None:
        await super().on_start()  # creates and starts the aiokafka consumer (and its fetcher)
        idle_s = self.consumer.idle_fetch_s
        if idle_s > 0:
            hold_empty_fetches(self._consumer._fetcher, idle_s)


def fast_transport(app, idle_fetch_s: float):
    """The transport for ``app.transport`` (set it before the app's first topic)."""

    class Consumer(FastDrainConsumer):
        pass

    Consumer.idle_fetch_s = idle_fetch_s

    class Transport(faust_aiokafka.Transport):
        pass

    Transport.Consumer = Consumer
    return Transport(app.conf.broker_consumer, app)
