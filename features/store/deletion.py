"""User deletion in one namespace: everything stored of a user gone at once, and kept gone for a grace period.

``delete_users(store, deletions, now_ms, grace_ms)`` removes each user's stream, profile
counters and seen window (Redis: the user's one hash; SQLite: its rows of the three tables)
and records a *deleted-users marker* until ``now_ms + grace_ms``, atomically (one Lua
script call; one ``BEGIN IMMEDIATE`` transaction). Until the marker's grace period ends,
the append drops every action of that user (``AppendResult.refused == USER_DELETED``, in
the append's own script call or transaction, so no append can slip between a deletion and
the check): late actions, redeliveries after a crash and retries never bring the user back.
The marker holds the user's key (Redis: a sorted set ``_hisam:<project>:deleted`` of user
keys scored by the end of their grace period) or id (SQLite: the table
``<project>_hisam_deleted``) and nothing else; markers whose grace period ended are removed
by the next deletion or append that looks at them.

Exactly once per namespace: a deletion names its source record (topic, partition, offset),
and the namespace's applied record (``applied_offsets``) is raised in the same script call or
transaction; a deletion at or below it was applied before (a redelivery, a group replaying
the deletions topic) and does nothing, so a replay never deletes what a user wrote after its
grace period. Several namespaces (older re-tokenisation namespaces beside the one a worker
writes) are each deleted from on their own: atomic per namespace, and exactly once in each.

Redis Cluster: a user's key, the marker and the applied record live in different hash slots,
so there the steps are separate commands, in an order that a crash can repeat safely (the
marker first, then the user's key, then the applied record), and the append reads the
marker just before its per-action calls instead of inside them.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from features import encoding as enc
from features.store.markers import redis_deleted_key, sqlite_deleted_table
from features.store.records import AppliedOffset
from features.store.ttl import sqlite_expiry_table


@dataclass(frozen=True)
class Deletion:
    """One user to delete and its source record (the applied record makes it exactly once)."""

    user_id: int
    topic: str
    partition: int
    offset: int
    timestamp_ms: int = -1  # the source record's Kafka timestamp (-1: unknown)

    def __post_init__(self) -> None:
        if self.user_id < 0:
            raise ValueError(f"user_id must be non-negative, got {self.user_id}")
        if not self.topic or any(c in self.topic for c in ": =@\t\n") or self.partition < 0 or self.offset < 0:
            raise ValueError(f"not a source record: {self.topic!r}[{self.partition}] @ {self.offset}")


@dataclass(frozen=True)
class Deleted:
    """What a deletion did: ``deleted`` False when its source record was applied before (a
    replay: nothing was done); ``until_ms`` the end of the user's grace period (0: no marker)."""

    user_id: int
    deleted: bool
    until_ms: int


def _fresh(d: Deletion, before: tuple[int, int] | None) -> bool:
    """Not applied before: above the applied record's (offset, timestamp) of its partition, or at or
    below it but produced after it (the topic was recreated and its offsets started again)."""
    if before is None:
        return True
    off, ts = before
    return d.offset > off or (d.timestamp_ms >= 0 and ts >= 0 and d.timestamp_ms > ts)


def now_ms() -> int:
    return int(time.time() * 1000)


def delete_users(store, deletions: Sequence[Deletion], now: int | None = None, grace_ms: int = 0) -> list[Deleted]:
    """Delete the users of ``deletions`` from ``store``'s namespace (module doc), in order.

    ``grace_ms``: how long after ``now`` (default: the clock) the users' actions are dropped.
    """
    if grace_ms < 0:
        raise ValueError(f"grace_ms must be non-negative, got {grace_ms}")
    if not deletions:
        return []
    now = now_ms() if now is None else int(now)
    applied: dict[tuple[str, int], AppliedOffset] = {}
    for d in deletions:
        k = (d.topic, d.partition)
        if k not in applied or d.offset > applied[k].offset:
            applied[k] = AppliedOffset(d.offset, d.timestamp_ms)
    if store.config.backend == "redis":
        if store.config.redis_cluster:
            return _delete_redis_cluster(store, deletions, now, now + grace_ms, applied)
        return _delete_redis(store, deletions, now, now + grace_ms, applied)
    return _delete_sqlite(store, deletions, now, now + grace_ms, applied)


# ---- Redis -----------------------------------------------------------------------------------


def _delete_script(store):
    script = getattr(store, "_delete_script", None)
    if script is None:
        from features.store.redis import _APPLIED_LUA, _PRELUDE_LUA

        lua = (resources.files(__package__) / "lua" / "delete.lua").read_text(encoding="utf-8")
        script = store._delete_script = store._client.register_script(_PRELUDE_LUA + "\n" + _APPLIED_LUA + "\n" + lua)
    return script


def _spec(applied: dict[tuple[str, int], AppliedOffset]) -> bytes:
    return " ".join(f"{t}:{p}={a.offset}@{a.timestamp_ms}" for (t, p), a in applied.items()).encode()


def _delete_redis(store, deletions, now: int, until: int, applied) -> list[Deleted]:
    from features.store.base import OnlineStoreError

    u32 = struct.Struct("<I").pack
    parts = []
    for d in deletions:
        src, off, ts = f"{d.topic}:{d.partition}".encode(), b"%d" % d.offset, b"%d" % d.timestamp_ms
        parts += [u32(len(src)), src, u32(len(off)), off, u32(len(ts)), ts]
    keys = [store._key(d.user_id) for d in deletions]
    keys += [store._applied_key, redis_deleted_key(store.config.project)]
    try:
        got = _delete_script(store)(keys=keys, args=[b"".join(parts), now, until, _spec(applied)])
    except store._redis.exceptions.ResponseError as e:
        raise OnlineStoreError(f"users not deleted: {e}") from e
    return [Deleted(d.user_id, bool(got[2 * i]), int(got[2 * i + 1])) for i, d in enumerate(deletions)]


def _delete_redis_cluster(store, deletions, now: int, until: int, applied) -> list[Deleted]:
    """Separate commands (module doc): marker, then the user's key, then the applied record."""
    client, marker = store._client, redis_deleted_key(store.config.project)
    before = {}
    for t, p in {(d.topic, d.partition) for d in deletions}:
        off, _, ts = (store._client.hget(store._applied_key, f"{t}:{p}") or b"").partition(b"@")
        before[(t, p)] = (int(off), int(ts) if ts.lstrip(b"-").isdigit() else -1) if off.isdigit() else None
    client.zremrangebyscore(marker, "-inf", now)
    out = []
    for d in deletions:
        key = store._key(d.user_id)
        fresh = _fresh(d, before[(d.topic, d.partition)])
        if fresh:
            client.zadd(marker, {key: until}, gt=True)
            client.delete(key)
        out.append(Deleted(d.user_id, fresh, int(client.zscore(marker, key) or 0)))
    store.append_batch([], applied=applied)
    return out


# ---- SQLite ----------------------------------------------------------------------------------


def _delete_sqlite(store, deletions, now: int, until: int, applied) -> list[Deleted]:
    from features.store.sqlite import _APPLIED_UPSERT, _write_transaction

    conn = store._conn()
    t = sqlite_deleted_table(store.config.project)
    out = []
    with _write_transaction(conn):
        conn.execute(f'DELETE FROM "{t}" WHERE until_ms <= ?', (now,))
        q = f'SELECT part, applied, ts FROM "{store._applied_t}" WHERE topic = ?'
        before = {(tp, p): (o, ts) for tp in {d.topic for d in deletions} for p, o, ts in conn.execute(q, (tp,))}
        for d in deletions:
            fresh = _fresh(d, before.get((d.topic, d.partition)))
            if fresh:
                ek = enc.entity_key_bytes(enc.USER_ID_KEY, d.user_id)
                for table in (
                    store._stream_t,
                    store._profile_t,
                    store._seen_t,
                    sqlite_expiry_table(store.config.project),
                ):
                    conn.execute(f'DELETE FROM "{table}" WHERE entity_key = ?', (ek,))
                conn.execute(
                    f'INSERT INTO "{t}" (user_id, until_ms) VALUES (?, ?) '
                    "ON CONFLICT(user_id) DO UPDATE SET until_ms = max(until_ms, excluded.until_ms)",
                    (d.user_id, until),
                )
            row = conn.execute(f'SELECT until_ms FROM "{t}" WHERE user_id = ?', (d.user_id,)).fetchone()
            out.append(Deleted(d.user_id, fresh, int(row[0]) if row else 0))
        conn.executemany(_APPLIED_UPSERT.format(t=store._applied_t), [(tp, p, *a) for (tp, p), a in applied.items()])
    return out
