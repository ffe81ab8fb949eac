"""Deleted users in a Rank server: the stream workers' tombstones drop their anchor cache entries.

A user's deletion (stream/deletions.py) removes its stream from the online store, so the
next Rank call for it reads no stream and answers from the profile alone (``history_len =
0``); an anchor cache entry is keyed by the stream's version, so a deleted user's old entry
is never used again. It would still sit in the server's memory (the encoded history of a
deleted user) until the LRU evicted it: ``TombstoneListener`` follows the ``user-tombstones``
topic (every partition, from its end when the server starts: the cache starts empty) in a
thread of its own and hands each user to ``on_deleted`` (``Ranker.forget_user`` on the
serving event loop), which drops the entry at once. Every replica follows the topic on its
own (no consumer group, nothing committed). A broker that is down or a topic that does not
exist yet is retried every few seconds; Rank itself never waits on it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# stream.topics.USER_TOMBSTONES (serving does not import stream; a test checks they agree).
TOMBSTONE_TOPIC = "user-tombstones"


class TombstoneListener:
    """A thread that calls ``on_deleted(user_id)`` for every tombstone from now on (module doc)."""

    def __init__(
        self,
        bootstrap: str,
        on_deleted: Callable[[int], None],
        topic: str = TOMBSTONE_TOPIC,
        retry_s: float = 2.0,
    ) -> None:
        self.bootstrap, self.on_deleted, self.topic, self.retry_s = bootstrap, on_deleted, topic, retry_s
        self.applied = 0  # tombstones handed to on_deleted
        self.ready = threading.Event()  # set once the topic's partitions are assigned at their end
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hisam-tombstones", daemon=True)

    def start(self) -> TombstoneListener:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _connect(self):
        from infra.kafka import TopicPartition, consumer

        c = consumer(self.bootstrap, client_id="hisam-rank-tombstones")
        try:
            parts = c.partitions_for_topic(self.topic)
            if not parts:
                raise LookupError(f"no topic {self.topic} on {self.bootstrap} yet")
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            c.assign(tps)
            c.seek_to_end(*tps)
            for t in tps:
                c.position(t)
        except BaseException:
            c.close()
            raise
        return c

    def _run(self) -> None:
        from hisam_pb.v1 import events_pb2 as pb

        c = None
        while not self._stop.is_set():
            try:
                if c is None:
                    c = self._connect()
                    self.ready.set()
                    log.info("following %s: deleted users' anchor caches are dropped", self.topic)
                for records in c.poll(timeout_ms=200).values():
                    for r in records:
                        try:
                            uid = pb.UserTombstone.FromString(r.value).user_id
                        except Exception as e:  # noqa: BLE001 - not a tombstone: skip it, say so
                            log.warning("%s[%d]@%d is not a UserTombstone: %s", r.topic, r.partition, r.offset, e)
                            continue
                        self.on_deleted(uid)
                        self.applied += 1
            except Exception as e:  # noqa: BLE001 - the broker down or the topic missing: retry, Rank goes on
                log.warning("tombstones of deleted users (%s): %s; retrying in %.0fs", self.topic, e, self.retry_s)
                if c is not None:
                    c.close()
                    c = None
                self._stop.wait(self.retry_s)
        if c is not None:
            c.close()


def follow_tombstones(bootstrap: str | None, ranker, loop) -> TombstoneListener | None:
    """A started listener that drops ``ranker``'s entries of deleted users on ``loop`` (None: no bootstrap)."""
    if not bootstrap:
        return None
    return TombstoneListener(bootstrap, lambda uid: loop.call_soon_threadsafe(ranker.forget_user, uid)).start()
