"""The applied record: the highest source offset per (topic, partition) a batch applied, written
atomically with the batch's appends (real Redis and SQLite; docs/design.md, Guarantees)."""

from __future__ import annotations

import sqlite3
import uuid
from dataclasses import replace

import pytest

from features.store import AppliedOffset, OnlineStoreConfig, StreamAction, open_stream_store
from features.store.base import OnlineStoreError

N_CODES, T, W = 6, 5, 8
RUN = uuid.uuid4().hex[:8]

pytestmark = pytest.mark.redis


@pytest.fixture(params=["sqlite", "redis", "redis_cluster"])
def store(request, tmp_path, redis_url):
    backend = "sqlite" if request.param == "sqlite" else "redis"
    cfg = OnlineStoreConfig(
        backend=backend,
        repo_dir=tmp_path,
        redis_url=redis_url if backend == "redis" else None,
        redis_cluster=request.param == "redis_cluster",
        project=f"t_applied_{RUN}_{request.param}",
        stream_len=T,
        n_codes=N_CODES,
        seen_window=W,
    )
    s = open_stream_store(cfg)
    yield s
    if backend == "redis":
        s._client.delete(s._applied_key, *(s._key(u) for u in range(1, 4)))
    s.close()


def _action(user: int, k: int) -> StreamAction:
    return StreamAction(
        user_id=user,
        event_id=f"u{user}-e{k}",
        item_id=k,
        action=k % 4,
        event_time_ms=1_700_000_000_000 + k,
        item_tokens=tuple(k * 10 + j for j in range(N_CODES)),
    )


def _offs(store, topic: str) -> dict[int, int]:
    return {p: a.offset for p, a in store.applied_offsets(topic).items()}


def _events(store, user: int) -> list[str]:
    (s,) = store.read_streams([user])
    return [] if s is None else s.event_ids


def test_the_record_keeps_the_highest_offset_per_partition(store) -> None:
    assert _offs(store, "user-actions") == {}
    store.append_batch([_action(1, 0)], applied={("user-actions", 0): 5, ("user-actions", 1): 3})
    assert _offs(store, "user-actions") == {0: 5, 1: 3}
    # lower offsets (a redelivery, another group behind) never move it back
    store.append_batch([_action(1, 0), _action(1, 1)], applied={("user-actions", 0): 2, ("user-actions", 1): 9})
    assert _offs(store, "user-actions") == {0: 5, 1: 9}
    # per topic: another topic's record (the retry topic's) is its own
    store.append_batch([_action(2, 0)], applied={("g-user-actions-retry", 0): 7})
    assert _offs(store, "g-user-actions-retry") == {0: 7}
    assert _offs(store, "user-actions") == {0: 5, 1: 9}
    # no actions: only the record is written; neither: nothing at all
    assert store.append_batch([], applied={("user-actions", 2): 1}) == []
    assert store.append_batch([]) == []
    assert _offs(store, "user-actions") == {0: 5, 1: 9, 2: 1}
    assert _events(store, 1) == ["u1-e0", "u1-e1"]


def test_the_record_keeps_the_timestamp_of_its_offset(store) -> None:
    """The timestamp of the highest offset's record (how resume tells a recreated log)."""
    store.append_batch([_action(1, 0)], applied={("user-actions", 0): AppliedOffset(5, 1_700_000_000_123)})
    assert store.applied_offsets("user-actions") == {0: AppliedOffset(5, 1_700_000_000_123)}
    store.append_batch([], applied={("user-actions", 0): AppliedOffset(5, 42)})  # the same offset: kept
    store.append_batch([], applied={("user-actions", 0): AppliedOffset(4, 43)})
    assert store.applied_offsets("user-actions") == {0: AppliedOffset(5, 1_700_000_000_123)}
    store.append_batch([], applied={("user-actions", 0): AppliedOffset(6, 1_700_000_000_999)})
    store.append_batch([], applied={("user-actions", 1): 2})  # no timestamp: -1
    assert store.applied_offsets("user-actions") == {0: AppliedOffset(6, 1_700_000_000_999), 1: AppliedOffset(2)}
    with pytest.raises(ValueError):
        store.append_batch([], applied={("user:actions", 0): 1})


def test_a_batch_without_applied_leaves_the_record(store) -> None:
    store.append_batch([_action(1, 0)], applied={("user-actions", 0): 4})
    store.append_batch([_action(1, 1)])
    assert _offs(store, "user-actions") == {0: 4}


def test_a_refused_user_still_counts_as_applied(store) -> None:
    """Refused is done with (dead-lettered by the worker): the batch's offset is recorded."""
    store.append_batch([_action(1, 0)])
    if store.config.backend == "redis":
        store._client.delete(store._key(1))
        store._client.set(store._key(1), b"not a hash")
    else:
        conn = store._conn()
        conn.execute(f'UPDATE "{store._stream_t}" SET value = ? WHERE feature_name = ?', (b"\xde\xad", "sid_tokens"))
    res = store.append_batch([_action(1, 1), _action(2, 0)], applied={("user-actions", 0): 11})
    assert [bool(r.refused) for r in res] == [True, False]
    assert _offs(store, "user-actions") == {0: 11}


def test_a_batch_that_fails_does_not_move_the_record(store, monkeypatch) -> None:
    store.append_batch([_action(1, 0)], applied={("user-actions", 0): 3})
    bad = replace(_action(1, 1), item_tokens=(1, 2))  # the wrong token count: refused before any write
    with pytest.raises(ValueError):
        store.append_batch([_action(2, 0), bad], applied={("user-actions", 0): 8})
    with pytest.raises(ValueError):
        store.append_batch([_action(2, 0)], applied={("user-actions", 0): -1})
    assert _offs(store, "user-actions") == {0: 3}
    assert _events(store, 2) == []
    if store.config.backend == "sqlite":
        # the database fails mid-transaction, after the record was written: both roll back
        def broken_save(*args, **kwargs):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(store, "_save", broken_save)
        with pytest.raises(sqlite3.OperationalError):
            store.append_batch([_action(2, 0)], applied={("user-actions", 0): 8})
    else:
        # a record that is not a hash fails the call before anything is written
        store._client.delete(store._applied_key)
        store._client.set(store._applied_key, b"3")
        with pytest.raises(OnlineStoreError, match="not a hash"):
            store.append_batch([_action(2, 0)], applied={("user-actions", 0): 8})
        assert store._client.get(store._applied_key) == b"3"
        store._client.delete(store._applied_key)
        store.append_batch([], applied={("user-actions", 0): 3})
    assert _offs(store, "user-actions") == {0: 3}
    if not store.config.redis_cluster:  # Cluster: the record is written after the appends, never before
        assert _events(store, 2) == []
