"""User deletion in the stream worker: ``user-deletions`` -> every namespace it serves -> ``user-tombstones``.

``hisam user delete USER...`` produces a ``UserDeletion`` per user to ``user-deletions``,
keyed by user id (as ``user-actions``). The worker's deletion agent (stream/app.py) gives
each batch to ``DeletionProcessor``, which deletes the users from the namespace the worker
appends to and from every older namespace it is told of (``DeletionSettings.namespaces``:
re-tokenisation's source namespaces, kept for rollback), each atomically and exactly once
(features/store/deletion.py): the stream, the profile counters and the seen window go, and
a marker makes the append drop the user's actions until ``grace_s`` after the deletion
(late actions, retries, redeliveries after a crash: none brings the user back). Then one
``UserTombstone`` per user goes to ``user-tombstones`` (keyed by user id): Rank servers
drop the user's anchor cache entry (serving/deletions.py), and the trainer skips the
user's samples produced before the end of the grace period (trainer/deletions.py). The
batch's offsets commit only after the tombstones are acknowledged; a crash before that
redelivers the batch, whose deletions are then no-ops in the store (the applied record)
and whose tombstones are sent again while the grace period lasts. A record that is not a
``UserDeletion`` (or names a negative user) is dead-lettered as ``decode_error`` /
``invalid_field``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from features.store import OnlineStoreConfig, StreamStore, open_stream_store
from features.store.deletion import Deletion, delete_users, now_ms
from hisam_pb.v1 import events_pb2 as pb
from infra.observability import STREAM_USERS_DELETED
from stream import records as rec
from stream.processing import BatchOutput, reject

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 3600.0


@dataclass(frozen=True)
class DeletionSettings:
    """How a worker deletes users: the grace period, and the older namespaces it also deletes from."""

    # How long after a deletion the user's actions are dropped: longer than any lag of
    # user-actions (and the retry topic's --unknown-item-max-age) behind user-deletions.
    grace_s: float = DEFAULT_GRACE_S
    # Namespaces besides the worker's own (older re-tokenisation namespaces): deleted from too.
    namespaces: tuple[OnlineStoreConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.grace_s < 0:
            raise ValueError(f"the deletion grace period must be non-negative, got {self.grace_s}s")


def namespace_config(own: OnlineStoreConfig, spec: str) -> OnlineStoreConfig:
    """Another namespace of the worker's store from ``PROJECT`` or ``PROJECT@REPO_DIR`` (the worker's
    --delete-also): the same backend and Redis; on SQLite the database under REPO_DIR (default: the
    worker's own --repo-dir). A SQLite database that does not exist is an error (nothing to delete
    from, and opening it would create it)."""
    from dataclasses import replace
    from pathlib import Path

    project, _, repo = spec.partition("@")
    if not project.isidentifier():
        raise ValueError(f"--delete-also {spec!r}: the project must be an identifier (PROJECT or PROJECT@REPO_DIR)")
    if repo and own.backend != "sqlite":
        raise ValueError(f"--delete-also {spec!r}: @REPO_DIR names a SQLite database; on Redis give the project only")
    cfg = replace(own, project=project, repo_dir=Path(repo) if repo else own.repo_dir, sqlite_path=None)
    if repo == "" and own.sqlite_path is not None:
        cfg = replace(cfg, sqlite_path=own.sqlite_path)
    if cfg.backend == "sqlite" and not cfg.sqlite_db.is_file():
        raise ValueError(f"--delete-also {spec!r}: no online store at {cfg.sqlite_db}")
    if (cfg.project, cfg.repo_dir) == (own.project, own.repo_dir):
        raise ValueError(f"--delete-also {spec!r} is the worker's own namespace")
    return cfg


def decode_deletion(raw: bytes | None) -> pb.UserDeletion:
    ev = rec.parse_message(pb.UserDeletion, raw)
    if ev.user_id < 0:
        raise rec.EventRejected(rec.INVALID_FIELD, f"user_id must be non-negative, got {ev.user_id}")
    return ev


def deletion_record(user_id: int, reason: str = "", requested_ms: int | None = None) -> tuple[bytes, bytes]:
    """The (key, value) of a deletion request for ``user_id`` (``hisam user delete``)."""
    if user_id < 0:
        raise ValueError(f"user ids are non-negative, got {user_id}")
    if len(reason.encode("utf-8")) > 256:
        raise ValueError("the reason is at most 256 bytes")
    ev = pb.UserDeletion(user_id=user_id, requested_ms=now_ms() if requested_ms is None else requested_ms)
    ev.reason = reason
    return rec.user_key(user_id), ev.SerializeToString()


class DeletionProcessor:
    """A batch of user-deletions -> the users deleted from every namespace -> tombstones (module doc)."""

    def __init__(
        self,
        stores: Sequence[StreamStore],
        settings: DeletionSettings,
        app_id: str = "",
        limits: rec.DeadLetterLimits | None = None,
    ) -> None:
        if not stores:
            raise ValueError("a DeletionProcessor needs at least one store")
        self.stores, self.settings, self.app_id = list(stores), settings, app_id
        self.limits = limits or rec.DeadLetterLimits()

    @classmethod
    def for_worker(cls, store: StreamStore, settings: DeletionSettings, app_id: str, limits) -> DeletionProcessor:
        """The worker's own store and its older namespaces' (opened here)."""
        return cls([*(open_stream_store(c) for c in settings.namespaces), store], settings, app_id, limits)

    def process(self, batch: Sequence[rec.ConsumedRecord]) -> BatchOutput:
        out = BatchOutput()
        todo: list[Deletion] = []
        for msg in batch:
            try:
                ev = decode_deletion(msg.value)
            except rec.EventRejected as e:
                reject(out, msg, e.reason, e.detail, self.limits)
                continue
            ts = getattr(msg, "timestamp", None)  # aiokafka's records have it (ms), RawMessage not
            todo.append(Deletion(ev.user_id, msg.topic, msg.partition, msg.offset, ts if isinstance(ts, int) else -1))
        if not todo:
            return out
        now = now_ms()
        grace_ms = int(self.settings.grace_s * 1000)
        done = [delete_users(s, todo, now, grace_ms) for s in self.stores]
        projects = [s.config.project for s in self.stores]
        for i, d in enumerate(todo):
            per = [r[i] for r in done]
            for project, r in zip(projects, per):
                if r.deleted:
                    STREAM_USERS_DELETED.labels(project=project).inc()
            until = max(r.until_ms for r in per)
            if not any(r.deleted for r in per) and until <= now:
                continue  # a replay of a deletion whose grace period ended long ago: nothing to say
            t = pb.UserTombstone(
                user_id=d.user_id, deleted_ms=now, until_ms=max(until, now), projects=projects, app_id=self.app_id
            )
            out.tombstones.append((rec.user_key(d.user_id), t.SerializeToString()))
        fresh = sum(any(r[i].deleted for r in done) for i in range(len(todo)))
        log.info("deleted %d users from %s (%d requests applied before)", fresh, projects, len(todo) - fresh)
        return out
