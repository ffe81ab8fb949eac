"""faust's aiokafka transport with a batch-level path for the stream's topics.

The stream worker is bound by one Python thread (the GIL): every microsecond faust spends
per record is a microsecond not spent appending. Three costs dominated profiles of a
worker draining a backlog, and none buys anything for this app:

* **faust's per-record stream machinery.** Each record became a ConsumerMessage, went
  through the conductor's handler into an Event, a channel queue, the stream iterator
  and its sensors, then ``take_events``' buffer, and was acked one by one: 25-32 us of
  the worker's GIL time per action (40-46%) when draining a backlog (2 us now).
  Records of a **batch topic** (``BatchTopic``, one per agent) skip all of it:
  ``FastDrainConsumer``'s fetch loop hands each fetched set of records to the topic's
  ``RecordBatches`` buffer as aiokafka's own records; the agent iterates whole
  ``RecordBatch`` objects through its faust stream (one stream step per batch: faust's
  stream iterator passes a value that is not an Event on as it is); ``RecordBatch.ack``
  marks all the batch's offsets acked in faust's own bookkeeping at once
  (``FastDrainConsumer.ack_batch``). faust still does everything else: subscription and
  group membership, rebalances, gaps, commits, the producer, agent supervision. A batch
  fetched before a rebalance is dropped unprocessed and unacked (faust seeks back to the
  committed offsets, as its streams skip the events of an old generation), and a
  rebalance waits for the batch in flight as it waits for unacked messages. Not kept:
  faust's per-message sensors (``on_message_in``/``out``, stream event counters); the
  monitor's stream inbound time and end offsets, which faust's livelock check reads, are.
* **take_events' fixed wait.** ``take_events`` stops buffering while the agent processes
  a batch and then waits its full ``within`` for more, so at a moderate rate every record
  paid that wait. Here the fetch loop keeps adding to the batch being formed while the
  agent is busy, and the agent takes it when it is full or when its oldest record has
  waited ``within_s``.
* **Fetch round trips.** A Kafka broker holds a fetch until data arrives or
  ``fetch.max.wait.ms`` passes; the embedded broker (noida-db) answers at once with
  nothing, so aiokafka's fetcher spins: measured 4,500 empty fetches/s and 94% of a core
  for one idle consumer. ``hold_empty_fetches`` emulates the broker's wait on the client:
  after a fetch that brought nothing, the next fetch to that broker waits ``idle_s``. (A
  fetch that brought records is followed at once: spacing those out too, to get fewer and
  larger fetch sets under a moderate load, changed nothing measurable.)

Records of other topics keep faust's per-record path, with one change to faust's fetch
loop: faust races each delivery against a flow suspension (``wait_first``: four tasks and
three cancellations per record); while the flow is active the delivery cannot block, so
it is awaited directly (145 -> 48 us of CPU per record on an agent that does nothing).

The fetch loop below is faust-streaming 0.15.3's ``Consumer._drain_messages`` and
``Consumer.getmany`` merged, with those changes; faust is pinned in pyproject.toml, and
tests/stream/test_stream_transport.py fails when the faust code copied or relied on here
changes under it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from time import monotonic

from faust.topics import Topic
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

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


# Exit status of a worker whose fetch position fell outside its partition's log (EX_CONFIG).
EXIT_OFFSET_OUT_OF_RANGE = 78


def fail_on_out_of_range(fetcher, on_out_of_range) -> None:
    """Call ``on_out_of_range({tp: position})`` when the broker answers a fetch with
    OFFSET_OUT_OF_RANGE, before aiokafka acts on its ``auto_offset_reset``.

    The worker's reset policy is "earliest" so that a new group starts at the beginning of
    its topics (``hisam run`` replays a dataset into new topics). The same policy would
    also apply when a group's position falls outside the log, silently: retention deleted
    records it had not read (they are lost), or the log was truncated or recreated below
    it (earliest would then replay the whole log, far more than the store's seen window can
    recognise, and double users' streams). Neither is the data's fault, and the worker
    cannot tell which records it had: the caller fails loudly (``FastDrainConsumer``).

    Detected as aiokafka's fetcher handles the response: a partition of the request that
    had a valid position before it and awaits a reset after it was out of range (a
    partition without a position, e.g. a new group's, is never in a fetch).
    """
    proc = fetcher._proc_fetch_request

    async def proc_then_check(assignment, node_id, request):
        before = {}
        for tp in assignment.tps:
            state = assignment.state_value(tp)
            if state.has_valid_position:
                before[tp] = state.position
        got = await proc(assignment, node_id, request)
        lost = {tp: pos for tp, pos in before.items() if assignment.state_value(tp).awaiting_reset}
        if lost:
            on_out_of_range(lost)
        return got

    fetcher._proc_fetch_request = proc_then_check


class _InFlight:
    """Stands for a batch in faust's set of unacked messages while an agent works on it.

    A rebalance waits (``Consumer.wait_empty``) until that set holds nothing unacked, so
    the batch in flight is finished and its offsets committed before its partitions move.
    """

    __slots__ = ("__weakref__", "acked", "refcount")

    def __init__(self) -> None:
        self.acked = False
        self.refcount = 1


class RecordBatch:
    """Consumed records handed to an agent as one batch, in fetch order (per partition: offset order).

    ``records`` are aiokafka ``ConsumerRecord`` objects (``topic``, ``partition``,
    ``offset``, ``key``, ``value``). ``ack()`` after the batch's effects are durable.
    """

    __slots__ = ("_in_flight", "_owner", "acked", "born", "generation", "records", "sealed", "spans")

    def __init__(self, owner: RecordBatches, generation: int, born: float) -> None:
        self.records: list = []
        self.spans: list[tuple[object, list[int]]] = []  # (TP, its offsets in this batch)
        self.generation = generation
        self.born = born  # when its first record reached the worker (monotonic)
        self.sealed = False  # no more records are added once sealed
        self.acked = False
        self._owner = owner
        self._in_flight: _InFlight | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _add(self, tp, records: list) -> None:
        self.records += records
        self.spans.append((tp, [r.offset for r in records]))

    async def ack(self, pending_limit: int | None = None) -> None:
        """Mark every offset of the batch acked (committable), then commit if enough are
        (``FastDrainConsumer.ack_batch``)."""
        await self._owner.consumer.ack_batch(self, pending_limit)


class RecordBatches:
    """The buffer between the fetch loop and one agent: record batches in fetch order.

    The fetch loop adds each fetched set of records (``add``); records join the newest
    batch until it holds ``batch_size``. The agent takes the oldest batch (``next``) when
    it is full, when a newer one exists, or when its oldest record has waited
    ``within_s``; the batch is sealed then. At most ``max_records`` wait here: beyond
    that the fetch loop waits for room (backpressure, as faust's full stream buffer).
    """

    def __init__(self, app, batch_size: int, within_s: float, max_records: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.app = app
        self.batch_size = batch_size
        self.within_s = within_s
        self.max_records = max(max_records, batch_size)
        self._batches: deque[RecordBatch] = deque()
        self._open: RecordBatch | None = None  # the newest batch while it may still grow
        self._n = 0  # records waiting here
        self._changed = asyncio.Event()  # set on add
        self._room = asyncio.Event()  # set while _n < max_records
        self._room.set()

    @property
    def consumer(self) -> FastDrainConsumer:
        return self.app.consumer

    def __len__(self) -> int:
        return self._n

    def has_room(self) -> bool:
        return self._n < self.max_records

    async def wait_room(self) -> None:
        await self._room.wait()

    def add(self, tp, records: list, generation: int) -> None:
        """Buffer records of one partition (called by the fetch loop, in fetch order)."""
        size = self.batch_size
        while records:
            b = self._open
            if b is None or b.sealed or b.generation != generation:
                b = self._open = RecordBatch(self, generation, monotonic())
                self._batches.append(b)
            take = size - len(b)
            part, records = (records, []) if len(records) <= take else (records[:take], records[take:])
            b._add(tp, part)
            self._n += len(part)
            if len(b) >= size:
                b.sealed = True
                self._open = None
        if self._n >= self.max_records:
            self._room.clear()
        self._changed.set()

    def _current(self, b: RecordBatch) -> bool:
        app = self.app
        return b.generation == app.consumer_generation_id and app.flow_control.is_active()

    async def next(self) -> RecordBatch:
        """The next batch to process (waits for one); batches of an old generation are dropped."""
        batches, within = self._batches, self.within_s
        while True:
            timeout = None
            if batches:
                b = batches[0]
                age = monotonic() - b.born
                if b.sealed or len(batches) > 1 or age >= within:
                    batches.popleft()
                    b.sealed = True
                    if b is self._open:
                        self._open = None
                    self._n -= len(b)
                    if self._n < self.max_records:
                        self._room.set()
                    if not self._current(b):
                        # Fetched before a rebalance: faust has seeked back to the committed
                        # offsets, so these records come again (as faust's streams skip events
                        # of an old generation). Not acked, so nothing is committed for them.
                        log.info("dropping a batch of %d records fetched before a rebalance", len(b))
                        continue
                    self.consumer.track_batch(b)
                    return b
                timeout = within - age
            self._changed.clear()
            if timeout is None:
                await self._changed.wait()
            else:
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout)
                except TimeoutError:
                    pass


class BatchTopic(Topic):
    """A faust topic whose agent's stream yields ``RecordBatch`` objects, not events.

    faust subscribes to it, assigns its partitions and supervises its agent as for any
    topic; its records never become events: the consumer buffers them in ``batches``,
    which every clone of the topic shares (an agent iterates a clone).
    """

    def __init__(self, *args, batches: RecordBatches | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches = batches

    def _clone_args(self):
        return {**super()._clone_args(), "batches": self.batches}

    async def __anext__(self) -> RecordBatch:  # type: ignore[override]
        # faust's stream iterator reads its channel with __anext__ (its queue stays empty):
        # a value that is not an Event goes to the agent as is, with nothing to ack.
        if not self.is_iterator:
            raise RuntimeError("Need to call topic.__aiter__()")
        return await self.batches.next()


def batch_topic(app, name: str, batch_size: int, within_s: float, max_records: int | None = None) -> BatchTopic:
    """A ``BatchTopic`` for ``app`` (whose transport is ``fast_transport``'s); agents iterate it."""
    transport = app.transport
    if not isinstance(transport, _FastTransport):
        raise TypeError("set app.transport = fast_transport(app, ...) before creating batch topics")
    batches = RecordBatches(app, batch_size, within_s, max_records or 4 * batch_size)
    topic = BatchTopic(app, topics=[name], internal=False, batches=batches)
    transport.batch_topics[name] = batches
    return topic


class FastDrainConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer: batch topics by the batch, direct per-record delivery, held empty fetches."""

    idle_fetch_s: float = 0.005

    def on_out_of_range(self, positions: dict) -> None:
        """A fetch position outside its log (``fail_on_out_of_range``): exit before anything
        is reset or committed, every time, until an operator sets the group's offsets."""
        log.critical(
            "fetch positions %s are outside their partitions' logs (records deleted by retention, or the "
            "log truncated or recreated); refusing to reset to the earliest offset and replay: set the "
            "group's offsets explicitly (docs/operations.md), then restart",
            {f"{tp.topic}[{tp.partition}]": pos for tp, pos in positions.items()},
        )
        logging.shutdown()
        os._exit(EXIT_OFFSET_OUT_OF_RANGE)

    def _new_consumer_thread(self):
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    # ---- the batch path: bookkeeping in faust's own structures ------------------------

    def track_batch(self, batch: RecordBatch) -> None:
        """A batch goes to its agent: a rebalance now waits for its ack (``wait_empty``)."""
        token = batch._in_flight = _InFlight()
        self._unacked_messages.add(token)  # a WeakSet: the batch holds the token
        now = monotonic()
        inbound = self.app.monitor.stream_inbound_time  # faust's livelock check reads it
        for tp, _ in batch.spans:
            inbound[tp] = now

    async def ack_batch(self, batch: RecordBatch, pending_limit: int | None = None) -> None:
        """``Consumer.ack`` for every record of the batch at once, then commit if too many are pending.

        A batch of an older generation is not acked (faust has seeked back to the committed
        offsets, so its records come again). Acked offsets are committed here, the commit
        awaited, once more than ``pending_limit`` acks are pending (by default once
        ``commit_every`` are): the caller's bound on what a crash may redeliver
        (``stream.app._pipeline``). A commit already running when this one is asked for
        (faust's periodic one) makes faust's ``commit`` wait for it and return without
        committing what was acked since: it is asked again then.
        """
        if batch.acked:
            return
        batch.acked = True
        token = batch._in_flight
        with ack_lock:
            if token is not None:
                token.acked = True
                self._unacked_messages.discard(token)
                batch._in_flight = None
            if batch.generation == self.app.consumer_generation_id:
                committed_offsets, acked_index, acked = self._committed_offset, self._acked_index, self._acked
                for tp, offsets in batch.spans:
                    committed = committed_offsets[tp]
                    index = acked_index[tp]
                    new = [o for o in offsets if o not in index and (committed is None or o >= committed)]
                    index.update(new)
                    acked[tp] += new
                    self._n_acked += len(new)
        notify(self._waiting_for_ack)
        if pending_limit is None:
            if self._commit_every is None:
                return
            pending_limit = self._commit_every - 1
        if batch.generation != self.app.consumer_generation_id or self._n_acked <= pending_limit:
            return
        self._n_acked = 0
        for _ in range(3):
            await self.commit()
            if self._committed(batch):
                break

    def _committed(self, batch: RecordBatch) -> bool:
        """Whether the batch's offsets are committed (or no longer this consumer's to commit)."""
        assignment = self.assignment()
        for tp, offsets in batch.spans:
            committed = self._committed_offset[tp]
            if tp in assignment and (committed is None or committed <= offsets[-1]):
                return False
        return True

    # ---- the fetch loop ------------------------------------------------------------------

    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - runs in every worker test
        # faust-streaming 0.15.3 Consumer._drain_messages with Consumer.getmany inlined.
        # Changed: records of batch topics go to their RecordBatches whole
        # (_deliver_batch); for the others the delivery is awaited directly while the flow
        # is active (_deliver_one_by_one).
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        batch_topics = self.transport.batch_topics
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                records, active_partitions = await self._wait_next_records(1.0)
                generation_id = self.app.consumer_generation_id
                await self.sleep(0)
                if records and not self.should_stop:
                    if not self.flow_active:
                        # faust's getmany: records fetched while the flow is stopped (a
                        # rebalance) are dropped, and the fetcher seeks back.
                        self.log.dev("getmany called while flow not active. Seek back to committed offsets.")
                        try:
                            await self.perform_seek()
                        except Exception as ex:
                            self.log.warning("exception performing seek when flow not active %r", ex, exc_info=True)
                    else:
                        rest = {}
                        for tp, recs in records.items():
                            if active_partitions is not None and not (
                                tp in active_partitions or tp in self._buffered_partitions
                            ):
                                continue
                            batches = batch_topics.get(tp.topic)
                            if batches is None:
                                rest[tp] = recs
                            elif not await self._deliver_batch(batches, tp, recs, generation_id):
                                break  # the flow stopped: a rebalance; what is left is refetched
                        if rest:
                            await self._deliver_one_by_one(rest, generation_id)
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

    async def _deliver_batch(self, batches: RecordBatches, tp, recs: list, generation_id: int) -> bool:
        """One partition's fetched records into its topic's buffer, with faust's read-offset and gap rules."""
        self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
        r_offset = self._read_offset[tp]
        if r_offset is not None and recs[0].offset < r_offset:
            recs = [r for r in recs if r.offset >= r_offset]  # faust drops what is below the read offset
            if not recs:
                return True
        # Gaps (offsets no record carries: transaction markers, compaction) count as acked
        # once the records around them are, as in faust's loop, which adds, for a record at
        # ``offset`` after one at ``prev``, the gap prev + 1 .. offset.
        first, last = recs[0].offset, recs[-1].offset
        acks_enabled = self.app.topics.acks_enabled_for(tp.topic)
        if acks_enabled and r_offset and first - r_offset > 1:
            await self._add_gap(tp, r_offset + 1, first)
        if acks_enabled and last - first != len(recs) - 1:
            prev = first
            for r in recs:
                if r.offset - prev > 1:
                    await self._add_gap(tp, prev + 1, r.offset)
                prev = r.offset
        if not batches.has_room():
            await self.wait_first(batches.wait_room(), self.suspend_flow.wait())
            if not (self.flow_active and batches.has_room()):
                return False
        batches.add(tp, recs, generation_id)
        self._read_offset[tp] = last
        return True

    async def _deliver_one_by_one(self, records, generation_id: int) -> None:
        # faust's getmany generator and the body of its fetch loop, per record.
        callback = self.callback
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        flow_control_active = self.app.flow_control.is_active
        to_message = self._to_message
        num_since_yield = 0
        for tp, record in self.scheduler.iterate(records):
            if not self.flow_active or self.app.consumer_generation_id != generation_id:
                break
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            message = to_message(tp, record)
            num_since_yield += 1
            if num_since_yield > 100:
                await asyncio.sleep(0)
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
                # faust always races the delivery against a flow suspension (wait_first).
                # With the flow active the delivery cannot block, and nothing can suspend
                # the flow before it returns (suspension runs in another task of this loop).
                if self.flow_active and flow_control_active():
                    await callback(message)
                else:
                    await self.wait_first(callback(message), self.suspend_flow.wait())
                set_read_offset(tp, offset)
            else:
                self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key, message.value)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    async def on_start(self) -> None:
        await super().on_start()  # creates and starts the aiokafka consumer (and its fetcher)
        fail_on_out_of_range(self._consumer._fetcher, self.consumer.on_out_of_range)
        idle_s = self.consumer.idle_fetch_s
        if idle_s > 0:
            hold_empty_fetches(self._consumer._fetcher, idle_s)


class _FastTransport(faust_aiokafka.Transport):
    batch_topics: dict[str, RecordBatches]


def fast_transport(app, idle_fetch_s: float) -> _FastTransport:
    """The transport for ``app.transport`` (set it before the app's first topic)."""

    class Consumer(FastDrainConsumer):
        pass

    Consumer.idle_fetch_s = idle_fetch_s

    class Transport(_FastTransport):
        pass

    Transport.Consumer = Consumer
    transport = Transport(app.conf.broker_consumer, app)
    transport.batch_topics = {}
    return transport
