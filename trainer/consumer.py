"""The training-samples consumer: every partition assigned, bounded micro-batches, dead letters, commits, lag.

A kafka-python ``KafkaConsumer`` with its own group id and auto-commit off, *assigned* every
partition of the topic: the trainer is a singleton (one model state), so there is nothing
for a group rebalance to share, and an assignment cannot be revoked mid-batch.
Micro-batches close at ``max_records`` samples or ``max_wait_s`` after their first record,
whichever comes first (bounded polls).

The offsets are the trainer's, not the group's: ``connect`` seeks where the durable state
says (the group's committed offsets only for partitions the state does not know), and the
service calls ``commit`` only after the snapshot that holds them (service.py).

Rejected samples (undecodable, another tokenizer's codes, wrong shapes: samples.py) are
counted by reason and written to the dead-letters topic with the reason (stream/records.py's
DeadLetter); the service flushes them before it commits the offsets past them, so nothing
is skipped silently: ``flush`` checks every send's result and raises when one failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from infra import observability as obs
from models.hmat.sequence import StreamLayout
from stream.records import RawMessage, dead_letter
from trainer.config import ServiceConfig
from trainer.samples import Example, SampleRejected, decode_sample

log = logging.getLogger(__name__)


def advance(offsets: dict[str, int], records: Iterable) -> None:
    """Move ``offsets`` ("topic:partition" -> next offset to read) past ``records``."""
    for r in records:
        key = f"{r.topic}:{r.partition}"
        offsets[key] = max(offsets.get(key, 0), r.offset + 1)


class DeliveryError(RuntimeError):
    """Dead letters the broker did not acknowledge: the offsets past them must not be committed."""


class SampleConsumer:
    """The training-samples topic in, dead letters out (module docstring)."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self._consumer = None
        self._producer = None
        self._pending: list = []  # (future, key, value, send error) of dead letters sent since the last flush

    def connect(self, offsets: dict[str, int]) -> None:
        """Assign every partition and seek to ``offsets`` (the durable state's) where it has one.

        The trainer resumes from its own record of what it trained, never from the group's
        committed offsets alone; ``earliest`` applies only to a partition the state has never
        read, or one whose recorded offset retention has already deleted (then the samples in
        between are gone, none is trained twice).
        """
        from infra.kafka import KafkaConsumer, KafkaProducer, TopicPartition

        c = KafkaConsumer(
            bootstrap_servers=self.cfg.bootstrap,
            group_id=self.cfg.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.cfg.max_records,
        )
        deadline = time.monotonic() + 30
        parts = c.partitions_for_topic(self.cfg.topic)
        while not parts:
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {self.cfg.topic} does not exist on {self.cfg.bootstrap}")
            time.sleep(0.2)
            c.topics()  # refresh metadata
            parts = c.partitions_for_topic(self.cfg.topic)
        tps = [TopicPartition(self.cfg.topic, p) for p in sorted(parts)]
        c.assign(tps)
        for part in tps:
            key = f"{part.topic}:{part.partition}"
            if key in offsets:
                c.seek(part, offsets[key])  # the durable state wins
            else:
                committed = c.committed(part)
                if committed is not None:
                    c.seek(part, committed)
                else:
                    c.seek_to_beginning(part)
        self._consumer = c
        self._producer = KafkaProducer(bootstrap_servers=self.cfg.bootstrap, acks="all", linger_ms=5)
        log.info("consuming %s (%d partitions) as group %s", self.cfg.topic, len(tps), self.cfg.group_id)

    def poll_batch(self, stop: threading.Event, wake: Callable[[], bool]) -> list:
        """One micro-batch of records; an empty one when the stream is idle and ``wake()`` says so.

        Sets ``stop`` after ``idle_exit_s`` without records (tests, benchmarks).
        """
        buf: list = []
        first = None
        idle_since = time.monotonic()
        while not stop.is_set():
            want = self.cfg.max_records - len(buf)
            got = self._consumer.poll(timeout_ms=100, max_records=want)
            for records in got.values():
                buf.extend(records)
            now = time.monotonic()
            if buf and first is None:
                first = now
            if len(buf) >= self.cfg.max_records or (first is not None and now - first >= self.cfg.max_wait_s):
                break
            if not buf and wake():
                break
            if not buf and self.cfg.idle_exit_s is not None and now - idle_since > self.cfg.idle_exit_s:
                stop.set()
        return buf

    def decode(self, records: list, layout: StreamLayout, tokenizer_version: str) -> tuple[list[Example], Counter]:
        """(the examples, rejections by reason); each rejected record is dead-lettered."""
        obs.TRAINER_SAMPLES_CONSUMED.inc(len(records))
        examples, rejected = [], Counter()
        for r in records:
            try:
                examples.append(decode_sample(r.value, layout, tokenizer_version))
            except SampleRejected as e:
                rejected[e.reason] += 1
                obs.TRAINER_SAMPLES_REJECTED.labels(reason=e.reason).inc()
                log.warning("rejecting %s[%d]@%d: %s", r.topic, r.partition, r.offset, e)
                msg = RawMessage(r.topic, r.partition, r.offset, r.key, r.value)
                dl = dead_letter(msg, e.reason, e.detail, int(time.time() * 1000))
                self.send_dead_letter(dl.key, dl.SerializeToString())  # the bounded key
        return examples, rejected

    def send_dead_letter(self, key: bytes, value: bytes) -> None:
        """Queue one dead letter; ``flush`` checks that the broker acknowledged it."""
        try:
            future = self._producer.send(self.cfg.dead_letter_topic, key=key, value=value)
        except Exception as e:  # noqa: BLE001 - refused before it left (too large, no metadata): flush reports it
            self._pending.append((None, key, value, f"{type(e).__name__}: {e}"))
            return
        self._pending.append((future, key, value, None))

    def flush(self, attempts: int = 3, timeout_s: float = 30.0) -> None:
        """Dead letters are durable when this returns; raises ``DeliveryError`` when one is not.

        Each send's result is checked (a producer's ``flush`` returns even when a send
        failed); a failed one is sent again, ``attempts`` times in all. The service calls this
        before the snapshot and the commit, so an error leaves the offsets uncommitted: the
        trainer exits and the batch, with its dead letters, is redelivered after the restart.
        """
        for attempt in range(1, attempts + 1):
            try:
                self._producer.flush(timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - timed out: the sends not done are reported below
                log.warning("flushing dead letters: %s", e)
            failed = []
            for future, key, value, error in self._pending:
                if future is None:
                    failed.append((key, value, error))
                elif not future.is_done:
                    failed.append((key, value, f"not acknowledged within {timeout_s:.0f}s"))
                elif future.failed():
                    failed.append((key, value, f"{type(future.exception).__name__}: {future.exception}"))
            self._pending = []
            if not failed:
                return
            why = failed[0][2]
            if attempt == attempts:
                raise DeliveryError(
                    f"{len(failed)} dead letter(s) to {self.cfg.dead_letter_topic} not delivered after "
                    f"{attempts} attempts ({why}): offsets not committed"
                )
            log.warning("%d dead letter(s) not delivered (%s): sending again", len(failed), why)
            time.sleep(0.2 * attempt)
            for key, value, _ in failed:
                self.send_dead_letter(key, value)

    def commit(self, offsets: dict[str, int]) -> None:
        from infra.kafka import OffsetAndMetadata, TopicPartition

        committed = {}
        for key, off in offsets.items():
            topic, _, part = key.rpartition(":")
            committed[TopicPartition(topic, int(part))] = OffsetAndMetadata(off, "", -1)
        if committed:
            self._consumer.commit(committed)

    def observe_lag(self, offsets: dict[str, int]) -> None:
        """Consumer lag per partition: the end offset (the consumer's, from its last fetch
        response: no broker round trip) less the next offset to read."""
        if self._consumer is None:
            return
        from infra.kafka import TopicPartition

        for key, next_offset in offsets.items():
            topic, partition = key.rsplit(":", 1)
            end = self._consumer.highwater(TopicPartition(topic, int(partition)))
            if end is not None:
                obs.TRAINER_CONSUMER_LAG.labels(topic=topic, partition=partition).set(max(0, end - next_offset))

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
