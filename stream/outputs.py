"""Producing a batch's outputs: record batches per partition, and dead letters the broker cannot refuse.

``RecordSender`` writes samples (and retries) as aiokafka record batches, one per
partition per emit. ``deliver_dead_letters`` sends dead letters one record each and, when
the broker refuses one for its size (a dead letter is bounded by ``DeadLetterLimits``, but
a topic's ``max.message.bytes`` may be smaller still), sends it once more without its
value and with its detail shortened (``records.shrink_dead_letter``); one refused even so
is logged with what identifies it and dropped: a dead letter never stops its partition
(docs/design.md, Guarantees). Any other failure propagates: the caller exits before the
batch's ack (crash-only).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

from hisam_pb.v1 import events_pb2 as pb
from infra.observability import STREAM_DEAD_LETTERS_DROPPED, STREAM_DEAD_LETTERS_SHRUNK
from stream import records as rec
from stream import topics as tp

log = logging.getLogger(__name__)


class RecordTooLarge(ValueError):
    """A record larger than the producer's whole record batch (``max_batch_size``)."""


# What a broker (or the producer) answers to a record it will never take, however often
# it is sent: the record's size is the data's fault, not the broker's.
SIZE_REFUSALS: tuple[type[BaseException], ...] = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    RecordTooLarge,
)


class RecordSender:
    """Sends keyed records as one record batch per partition; ``send`` returns the delivery futures.

    ``producer`` returns the started aiokafka producer (for the worker, faust's
    ``Producer._ensure_producer``: faust starts it after the app is built). The record
    batches are aiokafka's own (``create_batch`` / ``send_batch``, up to the producer's
    ``max_batch_size`` each), partitioned as aiokafka partitions a keyed send (the default
    murmur2 partitioner, the Java client's), so each key lands where a keyed send would put
    it. aiokafka's murmur2 is pure Python (~2 us a key, the largest per-record cost of a
    send): a key's partition is remembered, per topic and partition count.
    """

    def __init__(self, producer, max_keys: int = 1 << 16):
        self.producer = producer
        self.max_keys = max_keys
        self._partition_of: dict[tuple[str, int], dict[bytes, int]] = {}

    async def send(self, topic: str, records: Sequence[tuple[bytes, bytes]]) -> list[asyncio.Future]:
        if not records:
            return []
        aio = self.producer()
        n_partitions = len(aio._metadata.partitions_for_topic(topic) or ())
        cache = self._partition_of.setdefault((topic, n_partitions), {})
        if len(cache) >= self.max_keys:
            cache.clear()
        batches: dict[int, list] = {}
        for key, value in records:
            partition = cache.get(key)
            if partition is None:
                partition = cache[key] = aio._partition(topic, None, None, None, key, None)
            group = batches.get(partition)
            if group is None:
                group = batches[partition] = [aio.create_batch()]
            if group[-1].append(key=key, value=value, timestamp=None) is None:  # full: start another
                group.append(aio.create_batch())
                if group[-1].append(key=key, value=value, timestamp=None) is None:
                    raise RecordTooLarge(f"a {len(value)}-byte record does not fit in an empty {topic} batch")
        return [await aio.send_batch(b, topic, partition=p) for p, group in batches.items() for b in group]


def _describe(value: bytes) -> str:
    """What identifies a dead letter in a log line (its source, reason and content note)."""
    try:
        d = pb.DeadLetter.FromString(value)
    except Exception:  # noqa: BLE001 - only for the log line
        return f"an unreadable {len(value)}-byte dead letter"
    return f"{d.topic}[{d.partition}]@{d.offset} {d.reason}: {d.detail}"


async def _send_one(sender: RecordSender, record: tuple[bytes, bytes]) -> BaseException | None:
    """Send one dead letter and await it: None when acknowledged, the size refusal if refused."""
    try:
        await asyncio.gather(*await sender.send(tp.DEAD_LETTERS, [record]))
    except SIZE_REFUSALS as e:
        return e
    return None


async def deliver_dead_letters(sender: RecordSender, letters: Sequence[tuple[bytes, bytes]]) -> int:
    """Send dead letters and await their acknowledgements; returns how many were dropped (module doc).

    All are sent at once (one record batch each, so a refusal names its dead letter);
    those refused for their size are sent again shrunk, one by one.
    """
    if not letters:
        return 0
    sent = [asyncio.ensure_future(_send_one(sender, r)) for r in letters]
    refused = [(r, e) for r, e in zip(letters, await asyncio.gather(*sent)) if e is not None]
    dropped = 0
    for (_, value), e in refused:
        small = rec.shrink_dead_letter(value)
        log.error("the broker refused a %d-byte dead letter (%r); sending it without its value", len(value), e)
        STREAM_DEAD_LETTERS_SHRUNK.inc()
        again = await _send_one(sender, small)
        if again is not None:
            dropped += 1
            STREAM_DEAD_LETTERS_DROPPED.inc()
            log.critical("dead letter refused twice (%r), dropped: %s", again, _describe(small[1]))
    return dropped
