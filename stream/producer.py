"""Replay a dataset into the topics (kafka-python, idempotent producer).

Interactions are produced in time order, keyed by user id, at a chosen rate, so a
recorded dataset drives the stream like live traffic. Event ids are derived from the
dataset name and row, so replaying twice is harmless (the append is idempotent).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from hisam.pb.v1 import events_pb2 as pb
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


def make_producer(bootstrap: str, linger_ms: int = 5):
    """An idempotent producer (acks=all): a retried send is written once by the broker."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka import KafkaProducer

    return KafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=linger_ms,
        client_id="hisam-replay",
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


def produce(
    producer,
    topic: str,
    records: Iterable[tuple[bytes, bytes]],
    rate: float | None = None,
    progress_every: int = 10_000,
) -> ReplayStats:
    """Send (key, value) records, paced to ``rate`` per second (None: as fast as possible)."""
    start = time.perf_counter()
    n = 0
    for key, value in records:
        if rate:
            ahead = start + n / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        producer.send(topic, key=key, value=value)
        n += 1
        if progress_every and n % progress_every == 0:
            log.info("%s: %d sent (%.0f/s)", topic, n, n / (time.perf_counter() - start))
    producer.flush()
    return ReplayStats(n, time.perf_counter() - start)


def produce_actions(producer, events: Iterable[pb.ActionEvent], rate: float | None = None) -> ReplayStats:
    return produce(producer, tp.USER_ACTIONS, ((rec.user_key(e.user_id), e.SerializeToString()) for e in events), rate)


def produce_items(producer, events: Iterable[pb.ItemEvent], rate: float | None = None) -> ReplayStats:
    return produce(producer, tp.ITEM_EVENTS, ((str(e.item_id).encode(), e.SerializeToString()) for e in events), rate)
