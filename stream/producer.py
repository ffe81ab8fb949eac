"""Replay a dataset into the topics (kafka-python, idempotent producer).

Interactions are produced in time order, keyed by user id, at a chosen rate, so a
recorded dataset drives the stream like live traffic. Event ids are derived from the
dataset name and row, so replaying twice is harmless (the append is idempotent).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from hisam_pb.v1 import events_pb2 as pb
from stream import records as rec
from stream import topics as tp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayStats:
    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else float("inf")


def make_producer(bootstrap: str, linger_ms: int = 5, idempotent: bool = True):
    """A producer with acks=all. ``idempotent``: the broker writes a retried send once.

    ``idempotent=False`` gives the ordered at-least-once form instead: one request in flight
    per connection, so the client's retries keep each partition's order, and a retry may
    write a record twice (consumers drop it by event id). Use it against a broker that does
    not keep idempotent-producer state across a restart: the embedded broker forgets it,
    after which the idempotent client fails its in-flight batches (OutOfOrderSequenceNumber)
    and later batches can overtake them when re-sent. Apache Kafka keeps that state.
    """
    from infra.kafka import KafkaProducer

    ordering = {"enable_idempotence": True} if idempotent else {
        "enable_idempotence": False, "max_in_flight_requests_per_connection": 1,
    }  # fmt: skip
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=linger_ms,
        client_id="hisam-replay",
        **ordering,
    )


def action_from_label(label: int) -> int:
    """The dataset's binary label as an action: positive -> LIKE, negative -> DISLIKE."""
    return pb.ACTION_TYPE_LIKE if int(label) > 0 else pb.ACTION_TYPE_DISLIKE


def actions_from_interactions(interactions, dataset_name: str) -> Iterator[pb.ActionEvent]:
    """ActionEvents from a DataFrame with user_idx, item_idx, label, timestamp (epoch s), time-sorted."""
    df = interactions.sort_values("timestamp", kind="stable")
    for row, u, i, lab, ts in zip(df.index, df["user_idx"], df["item_idx"], df["label"], df["timestamp"]):
        yield rec.action_event(f"{dataset_name}:{row}", int(u), int(i), action_from_label(lab), int(ts) * 1000)


def item_events(items, now_ms: int) -> Iterator[pb.ItemEvent]:
    """ItemEvents from a dataset's ItemTable (absent modalities are left out)."""
    for i in range(len(items.ids)):
        emb: Mapping[str, np.ndarray | None] = {
            m: (items.features[m][i] if items.present[m][i] else None) for m in items.features
        }
        yield rec.item_event(int(items.ids[i]), emb, now_ms, title=items.titles[i])


class ProduceError(RuntimeError):
    """Records could not be delivered after every retry."""


def _deliver(producer, topic: str, pending: list, attempts: int = 5) -> list:
    """Flush and check every send of ``pending`` [(future, key, value)]; re-send failures in order.

    The broker acknowledged a record when its future succeeded. A failed send (e.g. the
    broker restarted and lost the idempotent producer's sequence state: kafka-python then
    fails the in-flight batches with OutOfOrderSequenceNumber after bumping its epoch) is sent
    again, in the original order, so a user's later action never overtakes an earlier one;
    consumers drop a re-sent record that did arrive after all by its event id.
    """
    for attempt in range(attempts):
        producer.flush()
        failed = [(k, v) for fut, k, v in pending if fut.failed()]
        if not failed:
            return []
        log.warning("%s: %d sends failed (%s); sending them again", topic, len(failed),
                    next(fut.exception for fut, _, _ in pending if fut.failed()))  # fmt: skip
        time.sleep(min(0.2 * 2**attempt, 2.0))
        pending = [(producer.send(topic, key=k, value=v), k, v) for k, v in failed]
    producer.flush()
    still = [(k, v) for fut, k, v in pending if fut.failed()]
    if still:
        raise ProduceError(f"{len(still)} records to {topic} not delivered after {attempts} attempts")
    return []


def produce(
    producer,
    topic: str,
    records: Iterable[tuple[bytes, bytes]],
    rate: float | None = None,
    progress_every: int = 10_000,
    check_every: int = 2_000,
    on_sent: Callable[[int], None] | None = None,
) -> ReplayStats:
    """Send (key, value) records, paced to ``rate`` per second (None: as fast as possible).

    Every ``check_every`` records (and at the end) the sends are flushed and checked; failed
    ones are sent again in order (``_deliver``), so a broker restart loses nothing.
    """
    start = time.perf_counter()
    n = 0
    pending: list = []
    for key, value in records:
        if rate:
            ahead = start + n / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        pending.append((producer.send(topic, key=key, value=value), key, value))
        if on_sent is not None:
            on_sent(n)  # the caller's per-record hook (hisam run: probes, progress), after the send
        n += 1
        if len(pending) >= check_every:
            pending = _deliver(producer, topic, pending)
        if progress_every and n % progress_every == 0:
            log.info("%s: %d sent (%.0f/s)", topic, n, n / (time.perf_counter() - start))
    _deliver(producer, topic, pending)
    return ReplayStats(n, time.perf_counter() - start)


def produce_actions(
    producer, events: Iterable[pb.ActionEvent], rate: float | None = None, on_sent: Callable[[int], None] | None = None
) -> ReplayStats:
    records = ((rec.user_key(e.user_id), e.SerializeToString()) for e in events)
    return produce(producer, tp.USER_ACTIONS, records, rate, on_sent=on_sent)


def produce_items(producer, events: Iterable[pb.ItemEvent], rate: float | None = None) -> ReplayStats:
    return produce(producer, tp.ITEM_EVENTS, ((str(e.item_id).encode(), e.SerializeToString()) for e in events), rate)
