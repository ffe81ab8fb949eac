"""The faust-streaming application: thin ``async for`` agents around stream.processing.

Each agent iterates a ``BatchTopic`` (stream/transport.py): faust subscribes to the topic,
assigns its partitions, supervises the agent and commits its offsets as for any topic,
but the consumer hands the agent whole ``RecordBatch`` objects (aiokafka's records as
fetched, up to ``batch_size``) instead of one faust Event per record. The agent gives a
batch to a processor in a one-thread executor (store writes and tokenizer calls block;
the event loop must not), produces the outputs and awaits their acknowledgements, then
acks the batch: all its offsets at once, in faust's own bookkeeping, so faust commits
them (after flushing its producer). The next batch is processed while one batch's
outputs and ack are in flight (``_pipeline``): the store round trip and the broker's
acknowledgement no longer wait on each other. Delivery is therefore at-least-once: a crash anywhere
redelivers the uncommitted batches, and the idempotent append (by event id) makes that
harmless. One executor thread per agent, and batches in fetch order, keep a partition's
order. A store outage is retried in place for a minute; a batch that still fails, or
whose outputs cannot be produced, makes the worker exit (crash-only) without acking it.

Where the time goes (py-spy and CPU time of one worker draining a 40,000-action backlog on
Redis, users with short streams, 2-core machine shared with other jobs, load 2: compare
ratios). Before: 75 us of worker CPU and 63 us of GIL time per action, of which faust's
per-record path (ConsumerMessage, conductor, Event, channel queue, stream iteration,
take_events, per-record acks) 25 us and the processing thread 28 us; 9,000 actions/s.
With batch topics: 27 us of CPU and 25 us of GIL time per action, the event loop's share
2 us (fetch loop, batch buffer, produce, ack), the processing thread's 20 us (decode, item
lookup, the script's argument and reply, the samples); 18,400 actions/s. At the steady
state (full streams: T items and W seen ids per user) the samples carry T-item histories
(~3.9 KB), and faust's default record batch (16 KB) held 4 of them: the produce path
(aiokafka's request encoding, per request) then cost the worker as much as everything
else (``StreamSettings.producer_batch_bytes``). With one record batch per partition per
emit the Redis server costs more per action than the worker (its Lua hashes every byte
of the stream fields the append script reads and writes); see ``hisam bench stream``.

Batches form while the agent is busy; an idle agent takes a partial batch once its oldest
record has waited ``batch_within_s`` (so a record waits at most that, plus the batch in
progress). Idempotency covers a redelivery only within the store's seen window of W event
ids per user (features/store/): what a crash redelivers after its store write is the
batch being processed, the one whose outputs and ack are in flight, and the acked ones
whose offsets are not committed yet. A batch's ack commits whenever that could otherwise
exceed W (``_pipeline``): at full load every batch, at a moderate one (small batches)
every few batches. ``create_app`` refuses W < 2 x batch size.

Hostile input (docs/design.md, Guarantees) never stops a partition. A dead letter is
bounded (``StreamSettings.dead_letter_*``: key and value cut, the whole ones' sizes and
SHA-256 in DeadLetter's own fields), and one the broker still refuses for its size is sent again without its
value, or else logged and dropped (``stream.outputs``). An action is refused at decode
when its event id exceeds the store's limit or its event time lies outside the bounds
(``max_event_*_s``). An action whose item has no semantic IDs yet goes to the group's
retry topic (``topics.action_retries``), and the third agent appends it once its item is
known, or dead-letters it after ``unknown_item_max_age_s``; its own offset commits once
the retry record is acknowledged, as for a dead letter. Order: a user's actions are
appended in their partition's offset order, except those whose item was unknown when
they came: each is appended when a retry finds its item, after whatever of that user was
appended meanwhile. A fetch position outside its partition's log makes the worker exit
(``transport.EXIT_OFFSET_OUT_OF_RANGE``) instead of silently replaying from the earliest
offset; a group without offsets resumes from the store's applied record (stream/resume.py).

Fault injection (tests): with ``StreamSettings.fault_exit_after_appends`` = N (the worker's
``HISAM_FAULT_EXIT_AFTER_APPENDS``) the worker exits abruptly (``os._exit``, like SIGKILL:
no commit, no leave) right after the store write that brings its appends to N or more,
before that batch's samples are sent or its offsets acked: the worst moment for
at-least-once, on purpose.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from features.store import OnlineStoreConfig, open_stream_store
from infra import kafka_security
from stream import records as rec
from stream import topics as tp
from stream.batch_metrics import count_actions, count_deletions, count_items, count_retries, observe_batch
from stream.deletions import DeletionProcessor, DeletionSettings
from stream.outputs import RecordSender, deliver_dead_letters
from stream.processing import ActionProcessor, BatchOutput, ItemProcessor, RetryProcessor, UnknownItemRetry
from stream.resume import resume_from_store

__all__ = ["RecordSender", "StreamSettings", "create_app", "run_worker"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSettings:
    """What a stream worker needs: the broker, the online store, batching, the tokenizer."""

    bootstrap: str
    store: OnlineStoreConfig
    app_id: str = "hisam-stream"
    tokenizer_dir: Path | None = None  # None: no item ingestion in this worker
    batch_size: int = 500
    # An idle agent takes a partial batch once its oldest record has waited this long (a
    # busy agent's next batch fills meanwhile and goes as soon as it is free). 0: at once,
    # whatever has arrived. Measured at a moderate load (5,000 actions/s, short streams):
    # 5 ms gave batches of 71 instead of 52, 20% less worker CPU per action, and twice
    # the latency (p50 14 ms instead of 8, p99 61 instead of 29).
    batch_within_s: float = 0.0
    partitions: int = 4
    commit_interval_s: float = 0.5
    # How long the group waits for a member that died without leaving (kill -9) before
    # handing its partitions to the others: the recovery time after a crash.
    session_timeout_s: float = 10.0
    # Static group membership (KIP-345): a worker restarted under the same id takes its
    # partitions back at once instead of waiting for the dead member to expire. The
    # embedded broker never expires a member that died without leaving, so on it this is
    # what makes crash recovery work at all. Unique per worker (a StatefulSet pod name).
    instance_id: str | None = None
    # Pause after an empty fetch (the embedded broker does not hold fetches; see
    # stream.transport.hold_empty_fetches). Bounds the idle fetch rate; adds at most this
    # to freshness.
    idle_fetch_s: float = 0.005
    # The producer's record batch size (Kafka's batch.size, faust's producer_max_batch_size):
    # the most sample bytes sent to one partition in one record batch. A sample carries
    # the user's history (~3.9 KB at T=300), so the 16 KB default held 4 samples: a batch
    # of 500 actions went out as ~125 record batches in ~30 produce requests, each encoded,
    # sent and acknowledged in Python. One batch per partition per emit halved the worker's
    # CPU per action in a steady-state drain (56-67 us instead of 98-132; broker 41-73
    # instead of 55-95; 5,882-7,111 actions/s instead of 4,904-6,725, 3 interleaved pairs),
    # and cut freshness p99 at 3,000 actions/s to 46-71 ms from 71-97 ms. Within the
    # default message.max.bytes (1 MB) of an Apache Kafka broker and topic.
    producer_batch_bytes: int = 512 * 1024
    # How long the producer waits for the broker to acknowledge a produce request before it
    # fails the batch's outputs (then the worker exits before the ack: crash-only). faust's
    # default is 1,200 s, during which the partition would stall unnoticed.
    producer_request_timeout_s: float = 30.0
    # How much of a bad record its dead letter carries (stream.records.DeadLetterLimits):
    # the value is cut to this, the key to dead_letter_key_bytes; sizes and SHA-256 of
    # the full ones go in DeadLetter's fields. Well within a broker's 1 MB message.max.bytes.
    dead_letter_value_bytes: int = 64 * 1024
    dead_letter_key_bytes: int = 1024
    # Accepted event times around the worker's clock (stream.records.EventTimeBounds).
    # None: unbounded. The past is unbounded by default: a replay of a dataset carries
    # its own (years old) times.
    max_event_future_s: float | None = 3600.0
    max_event_past_s: float | None = None
    # An action whose item has no semantic IDs yet is retried every this long (through
    # the group's retry topic, stream.topics.action_retries) until this old, then
    # dead-lettered as unknown_item (stream.processing.UnknownItemRetry). 0 max age:
    # dead-lettered at once.
    unknown_item_retry_s: float = 1.0
    unknown_item_max_age_s: float = 30.0
    # Replication of the topics this worker creates, and their min.insync.replicas (None:
    # the broker's default): 3 and 2 in production (stream.topics), 1 on the embedded broker.
    topic_replication: int = 1
    min_insync_replicas: int | None = None
    # User deletion (stream/deletions.py): the grace period, the older namespaces also deleted from.
    deletion: DeletionSettings = field(default_factory=DeletionSettings)
    # Fault injection (tests; module doc): exit after this many appends. None: never.
    fault_exit_after_appends: int | None = None


class _Progress:
    """Periodic throughput log of an agent (records/s, batch size, where the time goes)."""

    def __init__(self, name: str, every_s: float = 10.0):
        self.name, self.every_s = name, every_s
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.t0, self.n, self.batches, self.proc_s, self.emit_s = now, 0, 0, 0.0, 0.0
        self.dead = self.dups = 0

    def add(self, n: int, out: BatchOutput, proc_s: float, emit_s: float) -> None:
        self.n += n
        self.batches += 1
        self.proc_s += proc_s
        self.emit_s += emit_s
        self.dead += len(out.dead_letters)
        self.dups += out.duplicates
        now = time.perf_counter()
        if now - self.t0 >= self.every_s:
            span = now - self.t0
            log.info(
                "%s: %.0f/s over %.0fs, %.0f per batch, process %.0f%%, emit %.0f%%, %d dead-lettered, %d duplicates",
                self.name, self.n / span, span, self.n / self.batches, 100 * self.proc_s / span,
                100 * self.emit_s / span, self.dead, self.dups,
            )  # fmt: skip
            self._reset(now)


# Exit status of a worker that stopped itself rather than commit a batch it could not
# process (the store stayed unavailable, or the processor failed) (EX_TEMPFAIL): its
# supervisor restarts it and the batch is redelivered.
EXIT_STORE_UNAVAILABLE = 75


def _transient(exc: BaseException) -> bool:
    """Store errors worth retrying in place: the server is down or busy, not the data wrong."""
    import sqlite3

    import redis

    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, sqlite3.OperationalError))


def _process_with_retry(process, batch: Sequence[rec.ConsumedRecord], give_up_s: float = 60.0) -> BatchOutput:
    """Run a processor, retrying transient store errors with backoff for up to ``give_up_s``."""
    delay, deadline = 0.1, time.monotonic() + give_up_s
    while True:
        try:
            return process(batch)
        except Exception as e:  # narrowed by _transient; anything else propagates at once
            if not _transient(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("online store unavailable (%s); retrying the batch in %.1fs", e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _exit_before_ack(code: int) -> None:
    """Crash-only exit (after the caller logged why): the batch's offsets are never acked,
    so the batch is redelivered on restart.

    An agent that raised instead would be restarted by faust's supervisor and go on with
    the next batches, whose acks would then commit past the failed one's records.
    """
    logging.shutdown()
    os._exit(code)


async def _run_batch(loop, pool, process, records: Sequence[rec.ConsumedRecord]) -> BatchOutput:
    """Process one batch off the event loop; on failure, exit without acking anything."""
    try:
        return await loop.run_in_executor(pool, _process_with_retry, process, records)
    except Exception:  # any failure here must not reach the batch's ack
        log.critical(
            "a batch of %d records could not be processed; exiting before its offsets commit",
            len(records),
            exc_info=True,
        )
        _exit_before_ack(EXIT_STORE_UNAVAILABLE)
        raise  # not reached


class _InProcess:
    """The size of the batch an agent is processing now (0: none)."""

    size = 0


# How long a stopping agent waits for the outputs of its last batch.
FINISH_ON_STOP_S = 5.0


async def _pipeline(batches, pool, process, after, finish, in_process: _InProcess | None = None) -> None:
    """An agent's loop: batch k+1 is processed while batch k's outputs and ack are in flight.

    ``process`` runs in ``pool`` (one thread: batches in order); ``after(out)`` runs on
    the loop once a batch is written; ``finish(batch, out, t0, t1)`` produces its outputs,
    awaits their acknowledgements and acks the batch. A batch's ``finish`` starts only
    after the previous one's has ended, so outputs keep the input order and what is
    written and not acknowledged is never more than two batches; ``finish`` commits the
    offsets as needed to bound what is written and not committed (``in_process``: the
    size of the batch being processed, for it). On stop, the outputs in flight are given
    a few seconds to finish; what is not acknowledged is redelivered.
    """
    loop = asyncio.get_running_loop()
    finishing: asyncio.Future | None = None
    try:
        async for batch in batches:
            t0 = time.perf_counter()
            if in_process is not None:
                in_process.size = len(batch)
            try:
                out = await _run_batch(loop, pool, process, batch.records)
            finally:
                if in_process is not None:
                    in_process.size = 0
            t1 = time.perf_counter()
            if after is not None:
                after(out)
            if finishing is not None:
                await finishing
            finishing = asyncio.ensure_future(finish(batch, out, t0, t1))
        if finishing is not None:
            await finishing
    finally:
        if finishing is not None and not finishing.done():
            try:
                await asyncio.wait_for(asyncio.shield(finishing), FINISH_ON_STOP_S)
            except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001 - stopping anyway: redelivered
                log.warning("stopping with a batch's outputs unacknowledged (%r): it will be redelivered", e)


# Exit status of the fault-injection exit (128 + SIGKILL, what a killed process reports).
EXIT_FAULT_INJECTED = 137
# Exit status after a batch's samples or dead letters could not be produced (EX_IOERR).
EXIT_PRODUCE_FAILED = 74


def check_seen_window(settings: StreamSettings) -> None:
    """Refuse a store whose seen window cannot cover a redelivery (see the module doc)."""
    if settings.store.seen_window < 2 * settings.batch_size:
        raise ValueError(
            f"seen_window {settings.store.seen_window} < 2 x batch_size {settings.batch_size}: a crash could "
            "redeliver more of one user's actions than the store remembers, and re-append them"
        )


async def emit_outputs(sender: RecordSender, out: BatchOutput, n: int, retry_topic: str | None = None) -> None:
    """Produce a batch's samples, retries and dead letters and await their acknowledgements; exit if that fails.

    Record batches straight to the producer (not Topic.send, not one send per record):
    per-record sends cost ~12 us of CPU each, a record appended to a batch ~5 us. A batch
    whose outputs are lost must not be acked, so a failure exits before the ack (``n``:
    the batch's size, for the log; ``retry_topic``: the group's, for ``out.retries``).
    """
    try:
        futs = await sender.send(tp.TRAINING_SAMPLES, out.samples)
        if out.tombstones:  # the deletion agent's (stream/deletions.py)
            futs += await sender.send(tp.USER_TOMBSTONES, out.tombstones)
        if out.retries:
            if retry_topic is None:
                raise ValueError(f"{len(out.retries)} retries and no retry topic")
            futs += await sender.send(retry_topic, out.retries)
        dead = asyncio.ensure_future(deliver_dead_letters(sender, out.dead_letters))
        if futs:
            await asyncio.gather(*futs)  # acknowledged before the batch is acked
        await dead  # a dead letter refused for its size is sent shrunk, never stops the batch
    except Exception:
        log.critical(
            "the outputs of a batch of %d records could not be produced; exiting before its offsets commit",
            n,
            exc_info=True,
        )
        _exit_before_ack(EXIT_PRODUCE_FAILED)


class BatchFinisher:
    """An agent's ``finish`` for ``_pipeline``: emit the batch's outputs, ack it, then log and count it.

    The ack waits for the outputs' acknowledgements (a sample is never lost behind a
    committed offset); the counts wait for the ack (``observe_batch``). ``pending_limit()``
    is the most acks the batch may leave pending before its ack commits them (None:
    faust's ``commit_every``); ``count(n, out)`` records the agent's own counters;
    ``retry_topic`` takes the batch's retries (the group's, ``topics.action_retries``).
    """

    def __init__(
        self, app, sender: RecordSender, agent: str, count, pending_limit=None, retry_topic: str | None = None
    ) -> None:
        self.app, self.sender, self.agent, self.count = app, sender, agent, count
        self.pending_limit, self.retry_topic = pending_limit, retry_topic
        self.progress = _Progress(agent)

    async def __call__(self, batch, out: BatchOutput, t0: float, t1: float) -> None:
        t2 = time.perf_counter()
        await emit_outputs(self.sender, out, len(batch), self.retry_topic)
        await batch.ack(None if self.pending_limit is None else self.pending_limit())
        self.progress.add(len(batch), out, t1 - t0, time.perf_counter() - t2)
        self.count(len(batch), out)
        observe_batch(self.app.consumer, self.agent, batch, out, t0)


@dataclass
class SeenWindowLimit:
    """The action agent's ``pending_limit``: commit unless what a crash may then redeliver
    stays within the seen window (module doc): the acks pending, the batch in process (a
    full one if none is yet) and the next one."""

    seen_window: int
    batch_size: int
    in_process: _InProcess

    def __call__(self) -> int:
        return self.seen_window - (self.in_process.size or self.batch_size) - self.batch_size


class AppendFault:
    """The fault-injection hook (module doc): ``_pipeline``'s ``after`` for the action agent.

    Counts the appends of every written batch; once they reach ``exit_after`` (None:
    never) it exits like SIGKILL, before that batch's outputs are sent or its offsets acked.
    """

    def __init__(self, exit_after: int | None) -> None:
        self.exit_after = exit_after
        self.appended = 0

    def __call__(self, out: BatchOutput) -> None:
        self.appended += out.appended
        if self.exit_after is not None and self.appended >= self.exit_after:
            log.critical(
                "fault injection: exiting after %d appends, before the batch's samples and acks", self.appended
            )
            _exit_before_ack(EXIT_FAULT_INJECTED)


def _faust_app(settings: StreamSettings):
    """The faust app (raw keys and values, no web server, topics created by ``stream.topics``),
    with the process's Kafka security as its broker credentials (``infra.kafka_security``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import faust

    return faust.App(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        broker_credentials=kafka_security.active().faust_credentials(),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_allow_declare=False,  # topics are created by stream.topics.ensure_topics
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=settings.commit_interval_s,
        broker_commit_every=settings.batch_size,
        stream_buffer_maxsize=max(4096, 4 * settings.batch_size),
        producer_acks=-1,
        producer_max_batch_size=settings.producer_batch_bytes,
        producer_request_timeout=settings.producer_request_timeout_s,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_s / 5),
        broker_rebalance_timeout=settings.session_timeout_s,
        consumer_group_instance_id=settings.instance_id,
    )


@dataclass(frozen=True)
class AgentLoop:
    """What one agent runs: ``_pipeline`` with everything but the batches. The agent
    functions stay in ``create_app``: faust labels an agent's log lines by its function's
    qualified name."""

    pool: ThreadPoolExecutor  # one thread: a partition's batches are processed in order
    process: Callable[[Sequence[rec.ConsumedRecord]], BatchOutput]
    after: Callable[[BatchOutput], None] | None
    finish: BatchFinisher
    in_process: _InProcess | None = None

    async def run(self, batches) -> None:
        await _pipeline(batches, self.pool, self.process, self.after, self.finish, self.in_process)


def _seconds_ms(s: float | None) -> int | None:
    return None if s is None else int(s * 1000)


def action_processor(settings: StreamSettings, store) -> ActionProcessor:
    """The action agents' processor, with the settings' dead-letter limits, time bounds and retry."""
    return ActionProcessor(
        store,
        rec.DeadLetterLimits(key_bytes=settings.dead_letter_key_bytes, value_bytes=settings.dead_letter_value_bytes),
        rec.EventTimeBounds(_seconds_ms(settings.max_event_future_s), _seconds_ms(settings.max_event_past_s)),
        UnknownItemRetry(int(settings.unknown_item_retry_s * 1000), int(settings.unknown_item_max_age_s * 1000)),
    )


def _action_loop(app, settings: StreamSettings, store, sender: RecordSender) -> AgentLoop:
    """Actions: appended to the users' streams; commits bounded by the seen window; the fault hook."""
    process = action_processor(settings, store).process
    pool = ThreadPoolExecutor(1, thread_name_prefix="hisam-actions")
    in_process = _InProcess()
    limit = SeenWindowLimit(settings.store.seen_window, settings.batch_size, in_process)
    finish = BatchFinisher(app, sender, "actions", count_actions, limit, tp.action_retries(settings.app_id))
    return AgentLoop(pool, process, AppendFault(settings.fault_exit_after_appends), finish, in_process)


def _retry_loop(app, settings: StreamSettings, store, sender: RecordSender) -> AgentLoop:
    """Actions whose item was unknown, from the retry topic: appended once their item is known.

    Its own thread, so its waits (until each retry is due) never hold up fresh actions. It
    commits after every batch: its redeliveries add at most two of its batches to what the
    seen window must cover.
    """
    process = RetryProcessor(action_processor(settings, store)).process
    pool = ThreadPoolExecutor(1, thread_name_prefix="hisam-retries")
    finish = BatchFinisher(app, sender, "retries", count_retries, lambda: 0, tp.action_retries(settings.app_id))
    return AgentLoop(pool, process, None, finish)


def _deletion_loop(app, settings: StreamSettings, store, sender: RecordSender) -> AgentLoop:
    """User deletions: from every namespace this worker serves, then tombstones (stream/deletions.py).
    It commits after every batch (deletions are rare; a redelivered one is a no-op in the store)."""
    limits = rec.DeadLetterLimits(settings.dead_letter_key_bytes, settings.dead_letter_value_bytes)
    process = DeletionProcessor.for_worker(store, settings.deletion, settings.app_id, limits).process
    pool = ThreadPoolExecutor(1, thread_name_prefix="hisam-deletions")
    return AgentLoop(pool, process, None, BatchFinisher(app, sender, "deletions", count_deletions, lambda: 0))


def _item_loop(app, settings: StreamSettings, store, sender: RecordSender) -> AgentLoop:
    """Item events: tokenized by the frozen tokenizer, their semantic IDs written."""
    import torch

    from models.tokenizer import FrozenTokenizer

    # Item batches are small matrices: torch's intra-op thread pool only adds
    # contention with the event loop and the consumer thread.
    torch.set_num_threads(1)
    limits = rec.DeadLetterLimits(
        key_bytes=settings.dead_letter_key_bytes, value_bytes=settings.dead_letter_value_bytes
    )
    item_proc = ItemProcessor(store, FrozenTokenizer.load(settings.tokenizer_dir), limits)
    pool = ThreadPoolExecutor(1, thread_name_prefix="hisam-items")
    log.info("item ingestion on, tokenizer %s", item_proc.tokenizer.version)
    return AgentLoop(pool, item_proc.process, None, BatchFinisher(app, sender, "items", count_items))


def create_app(settings: StreamSettings):
    """Build the faust app with its agents; the caller runs it (``run_worker``)."""
    check_seen_window(settings)
    app = _faust_app(settings)
    from stream.transport import batch_topic, fast_transport

    # Before the first topic asks for a transport.
    app.transport = fast_transport(app, settings.idle_fetch_s)
    # Batch topics: their agents get whole record batches (stream.transport's docstring).
    actions_topic = batch_topic(app, tp.USER_ACTIONS, settings.batch_size, settings.batch_within_s)
    store = open_stream_store(settings.store)
    # A store written with another n_codes or T would be misread and mis-appended: refuse to
    # start (OnlineStoreError, naming both layouts) rather than corrupt every stream.
    store.claim_layout()
    sender = RecordSender(app.producer._ensure_producer)  # faust starts its producer after this
    actions = _action_loop(app, settings, store, sender)

    @app.agent(actions_topic, name="hisam-actions")
    async def append_actions(batches) -> None:
        await actions.run(batches)

    retries = _retry_loop(app, settings, store, sender)
    retry_name = tp.action_retries(settings.app_id)
    retries_topic = batch_topic(app, retry_name, settings.batch_size, settings.batch_within_s)

    @app.agent(retries_topic, name="hisam-action-retries")
    async def retry_actions(batches) -> None:
        await retries.run(batches)

    deletions = _deletion_loop(app, settings, store, sender)
    deletions_topic = batch_topic(app, tp.USER_DELETIONS, settings.batch_size, settings.batch_within_s)

    @app.agent(deletions_topic, name="hisam-deletions")
    async def delete_users(batches) -> None:
        await deletions.run(batches)

    if settings.tokenizer_dir is not None:
        items = _item_loop(app, settings, store, sender)
        items_topic = batch_topic(app, tp.ITEM_EVENTS, settings.batch_size, settings.batch_within_s)

        @app.agent(items_topic, name="hisam-items")
        async def ingest_items(batches) -> None:
            await items.run(batches)
    else:
        log.warning("no tokenizer given: this worker does not consume %s", tp.ITEM_EVENTS)
    return app


def run_worker(settings: StreamSettings, loglevel: str = "info") -> None:
    """Run a faust worker for the app until SIGTERM/SIGINT (blocks)."""
    import faust

    topics = tp.default_topics(
        settings.partitions,
        replication=settings.topic_replication,
        min_insync_replicas=settings.min_insync_replicas,
        app_id=settings.app_id,
    )
    tp.ensure_topics(settings.bootstrap, topics)
    app = create_app(settings)
    store = open_stream_store(settings.store)  # a group without offsets: from what it applied
    resumed = [tp.USER_ACTIONS, tp.action_retries(settings.app_id), tp.USER_DELETIONS]
    try:
        resume_from_store(settings.bootstrap, settings.app_id, store, resumed)
    finally:
        store.close()
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
