"""Deleted users in the trainer: their pending samples are skipped, never trained on.

The stream worker that deletes a user (stream/deletions.py) sends a ``UserTombstone`` to
``user-tombstones`` with the end of the user's grace period (``until_ms``): until then the
worker drops the user's actions, so every sample of that user produced before ``until_ms``
is one of the deleted history. ``DeletedUsers`` reads the whole topic when the trainer
starts (every partition from its beginning: a restarted trainer knows every deletion the
topic still holds, so its retention must be at least that of ``training-samples``) and,
before each micro-batch, everything produced since, up to the topic's end at that moment;
``keep`` then drops the batch's samples whose user was deleted and whose record timestamp
(their produce time) lies before that user's ``until_ms``. The dropped samples' offsets
advance with the batch (they are consumed, not retried), they are counted
(``hisam_trainer_samples_of_deleted_users_total``) and not dead-lettered: the dead-letters
topic must not keep a copy of them. A sample key is its user id (``stream.records.user_key``);
a record whose key is not one is decided on its decoded user id. Tombstones that cannot be read
up to the topic's end in time stop the trainer (the batch untrained, its offsets uncommitted): it
never trains on a batch whose deletions it does not know.
"""

from __future__ import annotations

import logging
import time

from hisam_pb.v1 import events_pb2 as pb
from infra import observability as obs

log = logging.getLogger(__name__)


class DeletedUsers:
    """user id -> the end of its grace period, from the tombstones topic (module doc)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.until: dict[int, int] = {}
        self.skipped = 0
        self._consumer = None
        self._parts: list = []

    def _connect(self) -> bool:
        from infra.kafka import TopicPartition, consumer

        if self._consumer is None:
            self._consumer = consumer(self.bootstrap, client_id="hisam-trainer-tombstones")
        parts = self._consumer.partitions_for_topic(self.topic)
        if not parts:
            self._consumer.topics()  # refresh the metadata for the next try
            return False
        self._parts = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self._consumer.assign(self._parts)
        self._consumer.seek_to_beginning(*self._parts)
        log.info("following %s (%d partitions): deleted users' samples are skipped", self.topic, len(self._parts))
        return True

    def refresh(self, timeout_s: float = 10.0) -> None:
        """Read every tombstone produced until now (the topic's end when called)."""
        if not self._parts and not self._connect():
            return  # no topic yet: no deletion yet
        c = self._consumer
        end = c.end_offsets(self._parts)
        deadline = time.monotonic() + timeout_s
        while any(c.position(p) < end[p] for p in self._parts) and time.monotonic() < deadline:
            for records in c.poll(timeout_ms=100).values():
                for r in records:
                    try:
                        t = pb.UserTombstone.FromString(r.value)
                    except Exception as e:  # noqa: BLE001 - not a tombstone: skip it, say so
                        log.warning("%s[%d]@%d is not a UserTombstone: %s", r.topic, r.partition, r.offset, e)
                        continue
                    self.until[t.user_id] = max(self.until.get(t.user_id, 0), t.until_ms)
        behind = {p.partition: end[p] - c.position(p) for p in self._parts if c.position(p) < end[p]}
        if behind:  # never train on a batch whose deletions are not known yet: stop, the restart resumes
            raise RuntimeError(f"{self.topic} could not be read within {timeout_s:.0f}s ({behind} records behind)")

    def keep(self, records: list) -> list:
        """``records`` without the samples of deleted users produced before their grace period ended."""
        self.refresh()
        if not self.until:
            return records
        out = []
        for r in records:
            until = self.until.get(_user_of(r))
            if until is not None and r.timestamp < until:
                self.skipped += 1
                obs.TRAINER_SAMPLES_OF_DELETED_USERS.inc()
                continue
            out.append(r)
        if len(out) < len(records):
            log.info("skipped %d samples of deleted users", len(records) - len(out))
        return out

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()


def _user_of(record) -> int | None:
    key = record.key or b""
    if key.isdigit():
        return int(key)
    try:
        return pb.TrainingSample.FromString(record.value or b"").user_id
    except Exception:  # noqa: BLE001 - undecodable: decode_sample rejects it
        return None
