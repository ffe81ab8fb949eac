"""The deleted-users markers (features/store/deletion.py has the whole story): where they live, and
the check the appends make against them. Imported by both stores; imports neither."""

from __future__ import annotations

from collections.abc import Iterable

# The SQLite marker table (created by SqliteStreamStore with the others).
SQLITE_DELETED_DDL = (
    'CREATE TABLE IF NOT EXISTS "{t}" (user_id INTEGER PRIMARY KEY, until_ms INTEGER NOT NULL)',
    'CREATE INDEX IF NOT EXISTS "{t}_by_until" ON "{t}" (until_ms)',
)


def sqlite_deleted_table(project: str) -> str:
    return f"{project}_hisam_deleted"


def redis_deleted_key(project: str) -> bytes:
    return f"_hisam:{project}:deleted".encode()


def redis_deleted_keys(store, keys: Iterable[bytes], now: int) -> set[bytes]:
    """Redis Cluster's check before the per-action append calls: the keys whose users are deleted."""
    keys = list(dict.fromkeys(keys))
    if not keys:
        return set()
    marker = redis_deleted_key(store.config.project)
    scores = store._client.zmscore(marker, keys)
    if any(s is not None and s <= now for s in scores):  # ended grace periods
        store._client.zremrangebyscore(marker, "-inf", now)
    return {k for k, s in zip(keys, scores) if s is not None and s > now}


def sqlite_deleted_among(conn, project: str, user_ids: Iterable[int], now: int) -> set[int]:
    """The users among ``user_ids`` whose grace period has not ended (in the caller's transaction);
    removes the markers whose grace period has."""
    t = sqlite_deleted_table(project)
    conn.execute(f'DELETE FROM "{t}" WHERE until_ms <= ?', (now,))
    if conn.execute(f'SELECT 1 FROM "{t}" LIMIT 1').fetchone() is None:
        return set()
    ids = sorted(set(user_ids))
    out: set[int] = set()
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        q = f'SELECT user_id FROM "{t}" WHERE user_id IN ({",".join("?" * len(chunk))})'
        out.update(u for (u,) in conn.execute(q, chunk))
    return out
