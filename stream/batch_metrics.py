"""Metrics of an acknowledged batch, per agent (the stream worker's counters in
infra/observability.py; docs/operations.md "Metrics")."""

from __future__ import annotations

import time

from infra import observability as obs
from stream.processing import BatchOutput


def observe_batch(consumer, agent: str, batch, out: BatchOutput, t0: float) -> None:
    """The metrics of a batch whose outputs are acknowledged and whose offsets are acked.

    Recorded after the ack, so a batch the worker dies on before its ack is counted once,
    by the worker that processes it again. The latency runs from the start of processing
    to the ack. Freshness runs from each record's produce time (its Kafka timestamp; not
    the event time, which a replay takes from the dataset) to now, after the ack: an
    upper bound on when the store had it. The lag of each partition is the consumer's
    highwater mark (the partition's end at its last fetch) past the batch's last offset.
    """
    obs.STREAM_BATCH_LATENCY.labels(agent=agent).observe(time.perf_counter() - t0)
    obs.STREAM_SAMPLES_PRODUCED.inc(len(out.samples))
    fresh = obs.STREAM_FRESHNESS.labels(agent=agent)
    now_ms = time.time() * 1000.0
    for r in batch.records:  # aiokafka records
        if r.timestamp > 0:
            fresh.observe(max(0.0, now_ms - r.timestamp) / 1000.0)
    for tp_, offsets in batch.spans:  # per partition, in offset order
        end = consumer.highwater(tp_)
        if end is not None:
            obs.STREAM_CONSUMER_LAG.labels(topic=tp_.topic, partition=str(tp_.partition)).set(
                max(0, end - offsets[-1] - 1)
            )


def count_actions(n: int, out: BatchOutput) -> None:
    """An acked batch of ``n`` actions: consumed, appended, recognised as redelivered."""
    obs.STREAM_ACTIONS_CONSUMED.inc(n)
    obs.STREAM_ACTIONS_APPENDED.inc(out.appended)
    obs.STREAM_ACTION_DUPLICATES.inc(out.duplicates)


def count_retries(n: int, out: BatchOutput) -> None:
    """An acked batch of ``n`` retried actions: appended, recognised as redelivered (consumed
    was counted when they first came)."""
    obs.STREAM_ACTIONS_APPENDED.inc(out.appended)
    obs.STREAM_ACTION_DUPLICATES.inc(out.duplicates)


def count_items(n: int, out: BatchOutput) -> None:
    """An acked batch of ``n`` item events: consumed, semantic IDs written."""
    obs.STREAM_ITEMS_CONSUMED.inc(n)
    obs.STREAM_ITEMS_WRITTEN.inc(out.items_written)


def count_deletions(n: int, out: BatchOutput) -> None:
    """An acked batch of ``n`` deletion requests: its tombstones were acknowledged."""
    obs.STREAM_TOMBSTONES.inc(len(out.tombstones))
