"""Where a consumer group without committed offsets resumes: after what the online store applied.

A group with no committed offset on a partition starts at the earliest offset (faust's
``auto_offset_reset``). For a new deployment that is right; for a group whose offsets were
deleted, or a worker started under a new ``--app-id`` on an existing store, it replays the
whole retained log, while the append recognises a redelivery only among each user's last W
event ids: every older action would be appended a second time. So the store records, with
each batch's appends and atomically with them, the highest source offset per (topic,
partition) the batch applied (``StreamStore.append_batch``'s ``applied``; one record per
namespace, whatever the group), and before the worker joins its group ``resume_from_store``
commits, for every partition where the group has no committed offset and the store has a
record, the offset after the record. Per partition:

* the group has a committed offset: nothing changes, even when it lies behind the store's
  record. That is ordinary at-least-once redelivery (a worker that died before its commit;
  the worker keeps what it may redeliver within the seen window, docs/design.md), and the
  window recognises it; an operator who set the group's offsets on purpose is obeyed.
* the group has none, the store has a record: the group resumes W records (the seen
  window) before record + 1 (not before the log start), logged once per partition. The
  record is written with the appends, before the batch's samples, retries and dead letters
  are acknowledged; the worker keeps what is written and not committed within W records
  (stream/app.py), so re-reading the last W brings back every batch whose outputs may be
  missing, and each of its actions lies within its user's seen window: recognised, not
  appended again, its sample sent again while the stream holds it.
* the group has none, and the partition's log is verifiably not the one the record
  describes (the topic deleted and recreated, or a new broker): the record keeps the Kafka
  timestamp of its offset's record; where the log's record at that offset was produced at
  another time, or the log ends before the record while its last record is newer than the
  recorded one, the group starts at the earliest offset, logged. A record beyond the log
  end with nothing newer in the log (the log truncated, e.g. by an unclean leader election)
  is committed as it is (record + 1): the worker's first fetch then exits with status 78
  naming the position (stream/transport.py), and an operator decides (docs/operations.md).
  So is a record + 1 below the log start (retention deleted records never applied).
* neither has one: the earliest offset (a new deployment on an empty store).

The topics are user-actions and the group's own retry topic (whose offsets the retry agent
records under that topic's name). A group with members refuses a commit from outside
(a worker of the group already consuming): the members' own positions then stand.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from features.store import AppliedOffset, StreamStore
from infra.kafka import KafkaConsumer, KafkaError, Offsets, TopicPartition, commit_offsets, consumer

log = logging.getLogger(__name__)


def resume_from_store(
    bootstrap: str,
    group: str,
    store: StreamStore,
    topics: Sequence[str],
    redeliver: int | None = None,
    fetch_timeout_s: float = 10.0,
) -> dict[tuple[str, int], int]:
    """Commit record + 1 - ``redeliver`` (default: the store's seen window W; not below the log
    start) for ``group`` where it has no committed offset (module doc); returns what it committed,
    (topic, partition) -> offset."""
    back = store.config.seen_window if redeliver is None else redeliver
    offsets = Offsets(bootstrap, client_id=f"{group}-resume")
    reader = consumer(bootstrap, client_id=f"{group}-resume-check")  # no group: reads the logs only
    done: dict[tuple[str, int], int] = {}
    try:
        for topic in topics:
            recorded = store.applied_offsets(topic)
            if not recorded:
                continue
            ends = offsets.end(topic)
            committed = offsets.committed(group, topic)
            missing = {p: a for p, a in sorted(recorded.items()) if p in ends and p not in committed}
            if not missing:
                continue
            starts = reader.beginning_offsets([TopicPartition(topic, p) for p in missing])
            todo = {}
            for p, a in missing.items():
                tp_ = TopicPartition(topic, p)
                other = _another_log(reader, tp_, a, starts[tp_], ends[p], fetch_timeout_s)
                if other:
                    log.warning(
                        "not resuming %s[%d] from the online store's record (offset %d): %s; the group starts at "
                        "its earliest offset", topic, p, a.offset, other,
                    )  # fmt: skip
                else:
                    todo[p] = _position(a.offset + 1, back, starts[tp_], ends[p])
            try:
                commit_offsets(bootstrap, group, topic, todo)
            except KafkaError as e:
                log.warning(
                    "group %s has no committed offset on %s partitions %s and refused the online store's record "
                    "(%r): its members are consuming, their positions stand",
                    group, topic, sorted(todo), e,
                )  # fmt: skip
                continue
            for p, off in todo.items():
                log.warning(
                    "resuming %s[%d] at offset %d from the online store's record; the group had no committed offset "
                    "(applied up to %d; what is re-read lies within the seen window)",
                    topic, p, off, missing[p].offset,
                )  # fmt: skip
                done[(topic, p)] = off
    finally:
        reader.close()
        offsets.close()
    return done


def _position(after: int, back: int, start: int, end: int) -> int:
    """Where to resume: ``back`` records before ``after`` within the log; ``after`` itself where it
    lies outside the log (the worker then exits 78 at its first fetch: module doc)."""
    return max(start, after - back) if start <= after <= end else after


def _another_log(
    reader: KafkaConsumer, tp_: TopicPartition, a: AppliedOffset, start: int, end: int, timeout_s: float
) -> str | None:
    """Why the partition's log is verifiably not the one the record describes (module doc); None:
    it is, or it cannot be told (no timestamp recorded, the record's offset deleted by retention)."""
    if a.timestamp_ms < 0:
        return None
    if a.offset < end:
        ts = _timestamp_at(reader, tp_, a.offset, timeout_s) if a.offset >= start else None
        if ts is not None and ts != a.timestamp_ms:
            return (
                f"the log's record at that offset was produced at {ts} ms, the applied one at {a.timestamp_ms} ms "
                "(the topic was recreated)"
            )
        return None
    if end == 0:
        return "the log is empty and was never written to (the topic was recreated)"
    last = _timestamp_at(reader, tp_, end - 1, timeout_s) if end > start else None
    if last is not None and last > a.timestamp_ms:
        return (
            f"the log ends at {end}, before it, and its last record is newer ({last} ms) than the applied one "
            f"({a.timestamp_ms} ms) (the topic was recreated)"
        )
    return None


def _timestamp_at(reader: KafkaConsumer, tp_: TopicPartition, offset: int, timeout_s: float) -> int | None:
    """The Kafka timestamp of the record at ``offset`` (None: no such record within ``timeout_s``)."""
    reader.assign([tp_])
    reader.seek(tp_, offset)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for r in reader.poll(timeout_ms=200, max_records=1).get(tp_, []):
            return r.timestamp if r.offset == offset else None
    return None
