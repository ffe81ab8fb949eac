"""User deletion in the online store (features/store/deletion.py), against real Redis and SQLite:
everything of the user gone at once, other users untouched, its actions dropped for the grace
period (also redeliveries of what it had), a replayed deletion a no-op, and the marker gone
once the grace period ends."""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import replace

import pytest

from features import encoding as enc
from features.store import OnlineStoreConfig, StreamAction, open_stream_store
from features.store.deletion import Deletion, delete_users
from features.store.markers import redis_deleted_key, sqlite_deleted_table
from features.store.records import USER_DELETED

N_CODES, T, W = 6, 5, 16
RUN = uuid.uuid4().hex[:8]
TOPIC = "user-deletions"

pytestmark = pytest.mark.redis


@pytest.fixture(params=["sqlite", "redis", "redis_cluster"])
def store(request, tmp_path, redis_url):
    backend = "sqlite" if request.param == "sqlite" else "redis"
    cfg = OnlineStoreConfig(
        backend=backend,
        repo_dir=tmp_path,
        redis_url=redis_url if backend == "redis" else None,
        redis_cluster=request.param == "redis_cluster",
        project=f"t_delete_{RUN}_{request.param}",
        stream_len=T,
        n_codes=N_CODES,
        seen_window=W,
    )
    s = open_stream_store(cfg)
    yield s
    s.close()


def act(user: int, k: int) -> StreamAction:
    return StreamAction(user, f"{RUN}-{user}-{k}", k, 2, 1_000 + k, tuple(range(k, k + N_CODES)))


def user_traces(store, user: int) -> list:
    """Every stored trace of ``user`` in the namespace: its Redis keys, or its rows of any table."""
    ek = enc.entity_key_bytes(enc.USER_ID_KEY, user)
    if store.config.backend == "redis":
        return [k for k in store._client.keys(b"*") if ek in k and k.endswith(store.config.project.encode())]
    with sqlite3.connect(store.config.sqlite_db) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return [(t, n) for t in tables for n in ("entity_key",) if _has(db, t, n, ek)]


def _has(db, table: str, column: str, ek: bytes) -> bool:
    cols = [r[1] for r in db.execute(f'PRAGMA table_info("{table}")')]
    return column in cols and db.execute(f'SELECT 1 FROM "{table}" WHERE {column} = ?', (ek,)).fetchone() is not None


def markers(store) -> int:
    if store.config.backend == "redis":
        return store._client.zcard(redis_deleted_key(store.config.project))
    with sqlite3.connect(store.config.sqlite_db) as db:
        return db.execute(f'SELECT count(*) FROM "{sqlite_deleted_table(store.config.project)}"').fetchone()[0]


def test_delete_removes_everything_of_the_user_and_drops_its_actions_for_the_grace_period(store) -> None:
    store.append_batch([act(u, k) for u in (1, 2, 3) for k in range(4)])
    before = store.read_streams([1, 3])
    assert user_traces(store, 2)

    (d,) = delete_users(store, [Deletion(2, TOPIC, 0, 5)], grace_ms=1_500)
    assert d.deleted and d.until_ms > time.time() * 1000
    assert store.read_streams([2]) == [None]
    assert user_traces(store, 2) == []
    assert store.read_user_states([2]) == [None]
    assert [s.event_ids for s in store.read_streams([1, 3])] == [s.event_ids for s in before]  # untouched
    assert store.applied_offsets(TOPIC) == {0: (5, -1)}

    # late actions, and a redelivery of one it had: dropped, nothing written; others appended
    got = store.append_batch([act(2, 9), act(1, 9), act(2, 0)])
    assert [r.refused for r in got] == [USER_DELETED, "", USER_DELETED]
    assert got[1].appended and not got[0].duplicate
    assert user_traces(store, 2) == [] and store.read_streams([2]) == [None]
    assert store.read_streams([1])[0].event_ids[-1] == act(1, 9).event_id

    # a replay of the same record: nothing done (the applied record), the marker as it was
    (again,) = delete_users(store, [Deletion(2, TOPIC, 0, 5)], grace_ms=60_000)
    assert not again.deleted and again.until_ms == d.until_ms

    time.sleep(max(0.0, d.until_ms / 1000 - time.time()) + 0.05)
    (res,) = store.append_batch([act(2, 10)])  # the grace period is over: a new stream
    assert res.appended and store.read_streams([2])[0].event_ids == [act(2, 10).event_id]
    assert markers(store) == 0  # the ended grace period's marker is gone

    # a replay after the grace period does not delete what the user wrote since
    assert not delete_users(store, [Deletion(2, TOPIC, 0, 4)], grace_ms=60_000)[0].deleted
    assert store.read_streams([2])[0] is not None
    # a new deletion record does
    assert delete_users(store, [Deletion(2, TOPIC, 0, 6)], grace_ms=60_000)[0].deleted
    assert user_traces(store, 2) == [] and markers(store) == 1


def test_deletion_of_users_without_state_and_bad_input(store) -> None:
    got = delete_users(store, [Deletion(40, TOPIC, 1, 0), Deletion(41, TOPIC, 1, 1)], grace_ms=0)
    assert [g.deleted for g in got] == [True, True]
    assert store.append(act(40, 1)).appended  # grace 0: no marker, the user may come back at once
    with pytest.raises(ValueError, match="non-negative"):
        Deletion(-1, TOPIC, 0, 0)
    with pytest.raises(ValueError, match="not a source record"):
        Deletion(1, "a:b", 0, 0)
    with pytest.raises(ValueError, match="grace_ms"):
        delete_users(store, [Deletion(1, TOPIC, 0, 9)], grace_ms=-1)
    assert delete_users(store, []) == []


def test_optional_ttl_removes_a_silent_users_whole_state(store) -> None:
    ttl_store = open_stream_store(replace(store.config, project=store.config.project + "_ttl", stream_ttl_s=0.6))
    try:
        ttl_store.append_batch([act(u, k) for u in (1, 2) for k in range(3)])
        if ttl_store.config.backend == "redis":
            assert 0 < ttl_store._client.pttl(ttl_store._key(1)) <= 600
        time.sleep(0.4)
        ttl_store.append(act(2, 3))  # user 2 is written again: its TTL starts again
        time.sleep(0.4)
        ttl_store.append(act(3, 0))  # an append (SQLite removes the expired users in it)
        assert ttl_store.read_streams([1]) == [None] and user_traces(ttl_store, 1) == []
        assert len(ttl_store.read_streams([2])[0]) == 4
        (res,) = ttl_store.append_batch([act(1, 0)])  # back after the TTL: a new history, not a duplicate
        assert res.appended and ttl_store.read_streams([1])[0].event_ids == [act(1, 0).event_id]
    finally:
        ttl_store.close()
    with pytest.raises(ValueError, match="stream_ttl_s"):
        replace(store.config, stream_ttl_s=-1)


def test_a_recreated_deletions_topic_is_not_mistaken_for_a_replay(store) -> None:
    store.append_batch([act(50, 0), act(51, 0)])
    assert delete_users(store, [Deletion(50, TOPIC, 3, 8, timestamp_ms=1_000)], grace_ms=0)[0].deleted
    assert store.applied_offsets(TOPIC)[3] == (8, 1_000)
    # at or below the applied offset and produced no later: a replay
    assert not delete_users(store, [Deletion(51, TOPIC, 3, 7, timestamp_ms=900)])[0].deleted
    assert store.read_streams([51])[0] is not None
    # below it but produced after it: the topic was recreated, offsets started again
    assert delete_users(store, [Deletion(51, TOPIC, 3, 0, timestamp_ms=5_000)])[0].deleted
    assert store.read_streams([51]) == [None] and user_traces(store, 51) == []
