"""Hostile stored state and a hostile server: per-user refusal of a corrupt user's actions, the
stored-layout guard, bounded Redis timeouts (real Redis and SQLite)."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import replace

import numpy as np
import pytest
import redis

from features import encoding as enc
from features.store import OnlineStoreConfig, StreamAction, open_stream_store
from features.store.base import OnlineStoreError, redis_meta_field
from features.store.records import CORRUPT_USER_STATE
from infra.ports import HOST, free_port

N_CODES = 6
T = 5
W = 8  # one Redis window bucket: every action touches bucket 0

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def store(request, tmp_path_factory, redis_url):
    cfg = OnlineStoreConfig(
        backend=request.param,
        repo_dir=tmp_path_factory.mktemp(f"safety_{request.param}"),
        redis_url=redis_url if request.param == "redis" else None,
        project="t_safety",
        stream_len=T,
        n_codes=N_CODES,
        seen_window=W,
    )
    s = open_stream_store(cfg)
    yield s
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


# ---- corrupting one user's stored state, per backend ------------------------------------

_FV = enc.USER_STREAM_FV


def _corrupt_redis(store, user: int, kind: str) -> None:
    c, key = store._client, store._key(user)
    field = {f: enc.redis_field(_FV, f) for f in enc.STREAM_FEATURES}
    if kind == "wrong_type":
        c.delete(key)
        c.set(key, b"a string where the user's hash belongs")
    elif kind == "garbage_field":
        c.hset(key, field["sid_tokens"], b"\xde\xad\xbe\xef")
    elif kind == "truncated_list":
        c.hset(key, field["event_times_ms"], c.hget(key, field["event_times_ms"])[:-1])
    elif kind == "foreign_value":  # a well-formed Value of another type
        c.hset(key, field["actions"], enc.string_list_value(["x", "y"]))
    elif kind == "misaligned":  # well-framed, but 7 tokens for one item more
        (s,) = store.read_streams([user])
        c.hset(key, field["sid_tokens"], enc.int64_list_value([*s.tokens.ravel().tolist(), 7]))
    elif kind == "bad_window":  # a first record that parses, then a foreign one
        c.hset(key, redis_meta_field("seen:0"), b"\x00u1-e0\xff1" + b"\x00u1-e1\xffnot-a-seq")
    else:
        raise AssertionError(kind)


def _corrupt_sqlite(store, user: int, kind: str) -> None:
    conn, ek = store._conn(), enc.entity_key_bytes(enc.USER_ID_KEY, user)

    def set_value(name: str, value) -> None:
        q = f'UPDATE "{store._stream_t}" SET value = ? WHERE entity_key = ? AND feature_name = ?'
        assert conn.execute(q, (value, ek, name)).rowcount == 1

    def get_value(name: str) -> bytes:
        q = f'SELECT value FROM "{store._stream_t}" WHERE entity_key = ? AND feature_name = ?'
        return conn.execute(q, (ek, name)).fetchone()[0]

    if kind == "wrong_type":  # a TEXT where a Value belongs
        set_value("sid_tokens", "not a value")
    elif kind == "garbage_field":
        set_value("sid_tokens", b"\xde\xad\xbe\xef")
    elif kind == "truncated_list":
        set_value("event_times_ms", get_value("event_times_ms")[:-1])
    elif kind == "foreign_value":
        set_value("actions", enc.string_list_value(["x", "y"]))
    elif kind == "misaligned":
        (s,) = store.read_streams([user])
        set_value("sid_tokens", enc.int64_list_value([*s.tokens.ravel().tolist(), 7]))
    elif kind == "bad_window":
        q = f'UPDATE "{store._seen_t}" SET seq = ? WHERE entity_key = ? AND event_id = ?'
        assert conn.execute(q, ("not-a-seq", ek, f"u{user}-e1")).rowcount == 1
    else:
        raise AssertionError(kind)


def _stored(store, user: int):
    """Everything stored for a user, byte for byte."""
    if store.config.backend == "redis":
        return store._client.dump(store._key(user))
    conn, ek = store._conn(), enc.entity_key_bytes(enc.USER_ID_KEY, user)
    return [
        sorted(conn.execute(f'SELECT * FROM "{t}" WHERE entity_key = ?', (ek,)).fetchall(), key=repr)
        for t in (store._stream_t, store._profile_t, store._seen_t)
    ]


# kind -> what the refusal says is wrong (Redis, SQLite)
WHAT = {
    "wrong_type": ("the key holds a string, not a hash", "sid_tokens holds a str, not a Value"),
    "garbage_field": ("sid_tokens is not an int64 list Value", "sid_tokens does not decode"),
    "truncated_list": ("event_times_ms is truncated", "event_times_ms does not decode"),
    "foreign_value": ("actions is not an int64 list Value", "actions is a string_list_val Value"),
    "misaligned": ("2 event ids, 2 actions, 2 times and 13 tokens",) * 2,
    "bad_window": ("seen-window bucket 0 is not in the seen-window format", "hisam_seen holds a row whose"),
}
KINDS = list(WHAT)


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_user_is_refused_and_the_others_appended(store, kind: str, caplog) -> None:
    base = 1000 * (KINDS.index(kind) + 1)
    bad, good1, good2 = base, base + 1, base + 2
    store.append_batch([_action(u, k) for u in (bad, good1, good2) for k in range(2)])
    (_corrupt_redis if store.config.backend == "redis" else _corrupt_sqlite)(store, bad, kind)
    before = _stored(store, bad)

    batch = [_action(good1, 2), _action(bad, 2), _action(good2, 2), _action(bad, 3), _action(good1, 3)]
    with caplog.at_level(logging.WARNING, logger="features.store"):
        res = store.append_batch(batch)

    assert [r.appended for r in res] == [True, False, True, False, True]
    for r in (res[1], res[3]):
        assert r.refused == CORRUPT_USER_STATE and not r.duplicate and not r.resampled
        assert f"user {bad} " in r.detail
        key = store._key(bad) if store.config.backend == "redis" else enc.entity_key_bytes(enc.USER_ID_KEY, bad)
        assert repr(key) in r.detail  # the key, printable
        assert WHAT[kind][store.config.backend == "sqlite"] in r.detail  # and what is wrong
    assert _stored(store, bad) == before  # not a byte written for it
    warnings = [rec for rec in caplog.records if f"user {bad} " in rec.getMessage()]
    assert len(warnings) == 1  # one per refused user, not per action

    # The healthy users: their histories and streams as if the corrupt one did not exist.
    np.testing.assert_array_equal(res[0].history_actions, [0, 1])
    np.testing.assert_array_equal(res[4].history_actions, [0, 1, 2])
    np.testing.assert_array_equal(res[4].history_tokens[:, 0], [0, 10, 20])
    s1, s2 = store.read_streams([good1, good2])
    assert s1.event_ids == [f"u{good1}-e{k}" for k in range(4)]
    assert s2.event_ids == [f"u{good2}-e{k}" for k in range(3)]
    np.testing.assert_array_equal(s1.tokens[:, 0], [0, 10, 20, 30])

    # Still corrupt, still refused: each later action is checked again.
    (again,) = store.append_batch([_action(bad, 4)])
    assert again.refused == CORRUPT_USER_STATE
    assert _stored(store, bad) == before


def test_a_repaired_user_is_appended_again(store) -> None:
    """Refusal is no quarantine list: once the state is readable again, the user's actions go in."""
    user = 9000
    store.append_batch([_action(user, k) for k in range(2)])
    (_corrupt_redis if store.config.backend == "redis" else _corrupt_sqlite)(store, user, "garbage_field")
    assert store.append(_action(user, 2)).refused == CORRUPT_USER_STATE
    if store.config.backend == "redis":
        store._client.delete(store._key(user))
    else:
        conn, ek = store._conn(), enc.entity_key_bytes(enc.USER_ID_KEY, user)
        for t in (store._stream_t, store._profile_t, store._seen_t):
            conn.execute(f'DELETE FROM "{t}" WHERE entity_key = ?', (ek,))
    assert store.append(_action(user, 3)).appended
    assert store.read_streams([user])[0].event_ids == [f"u{user}-e3"]


def test_a_corrupt_stream_read_names_the_user(store) -> None:
    user = 9100
    store.append_batch([_action(user, k) for k in range(2)])
    (_corrupt_redis if store.config.backend == "redis" else _corrupt_sqlite)(store, user, "misaligned")
    with pytest.raises(OnlineStoreError, match=f"user {user}: .*7 per item|user {user}: .*{N_CODES} per item"):
        store.read_streams([user])


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_redis_a_stream_written_without_counters_is_checked_in_full(store) -> None:
    """A state the script did not write (no length signature) gets the full check, and its
    item count is taken from the stream (Feast writes no length field)."""
    user = 9200
    store.append_batch([_action(user, k) for k in range(T)])
    key = store._key(user)
    store._client.hdel(key, *(redis_meta_field(n) for n in ("len", "sig")))
    res = store.append(_action(user, T))
    assert res.appended and len(res.history_actions) == T
    assert store.read_streams([user])[0].event_ids == [f"u{user}-e{k}" for k in range(1, T + 1)]  # still T


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_redis_the_script_and_write_user_states_record_the_same_signature(store) -> None:
    from features.store.redis import stream_signature

    user, copy = 9400, 9401
    store.append_batch([_action(user, k) for k in range(T + 2)])
    fields = [enc.redis_field(_FV, f) for f in enc.STREAM_FEATURES]
    sig = redis_meta_field("sig")

    def recorded(u: int) -> tuple[bytes, bytes]:
        *values, got = store._client.hmget(store._key(u), [*fields, sig])
        return got, stream_signature(*values, T)

    written, expected = recorded(user)
    assert written == expected  # what the Lua script wrote is what Python computes
    (state,) = store.read_user_states([user])
    store.write_user_states([replace(state, stream=replace(state.stream, user_id=copy))])
    assert recorded(copy) == (written, expected)


def test_redis_an_error_of_redis_itself_fails_the_call_and_refuses_no_one(tmp_path) -> None:
    """Out of memory is not the user's fault: the batch fails (to be retried), nobody is refused."""
    from infra.services import redis_server

    with redis_server() as server:  # a private one: the session's must not run out of memory
        cfg = OnlineStoreConfig(
            backend="redis", redis_url=server.url, repo_dir=tmp_path, stream_len=T, n_codes=N_CODES, seen_window=W
        )
        store = open_stream_store(cfg)
        store.append_batch([_action(1, 0)])
        store._client.config_set("maxmemory-policy", "noeviction")
        store._client.config_set("maxmemory", "1")
        with pytest.raises(OnlineStoreError, match="OOM"):
            store.append_batch([_action(1, 1), _action(2, 0)])
        store._client.config_set("maxmemory", "0")
        assert [r.appended for r in store.append_batch([_action(1, 1), _action(2, 0)])] == [True, True]
        store.close()


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_redis_a_foreign_bucket_of_another_window_size_is_refused(store) -> None:
    """After a change of W the script moves a user's window from its old buckets: a foreign
    one among those is refused before anything is moved."""
    user = 9300
    wide = open_stream_store(replace(store.config, seen_window=64))  # 2 buckets
    wide.append_batch([_action(user, k) for k in range(6)])
    wide._client.hset(wide._key(user), redis_meta_field("seen:1"), b"foreign")
    before = _stored(store, user)
    (res,) = store.append_batch([_action(user, 6)])  # W = 8: 1 bucket
    assert res.refused == CORRUPT_USER_STATE and "bucket 1 of 2" in res.detail
    assert _stored(store, user) == before
    wide.close()


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_sqlite_corruption_found_mid_batch_refuses_the_users_earlier_actions_too(store) -> None:
    """A window row found bad only when looked up (a REAL seq sorts among the integers, so the
    load's check cannot see it): the user's earlier actions of the batch, applied in memory,
    are refused with it, and nothing is saved for the user."""
    user, other = 9500, 9501
    store.append_batch([_action(u, k) for u in (user, other) for k in range(2)])
    conn, ek = store._conn(), enc.entity_key_bytes(enc.USER_ID_KEY, user)
    conn.execute(f'UPDATE "{store._seen_t}" SET seq = 0.5 WHERE entity_key = ? AND event_id = ?', (ek, f"u{user}-e0"))
    before = _stored(store, user)
    res = store.append_batch([_action(user, 2), _action(other, 2), _action(user, 0)])
    assert [r.refused for r in res] == [CORRUPT_USER_STATE, "", CORRUPT_USER_STATE]
    assert res[1].appended and "seq 0.5" in res[0].detail and res[0].detail == res[2].detail
    assert _stored(store, user) == before
    assert store.read_streams([other])[0].event_ids == [f"u{other}-e{k}" for k in range(3)]


# ---- the stored layout ------------------------------------------------------------------


def test_claim_layout_records_then_refuses_another_layout(store) -> None:
    cfg = replace(store.config, project=f"t_layout_{store.config.backend}")
    first = open_stream_store(cfg)
    try:
        first.claim_layout()  # records
        first.claim_layout()  # the same: passes
        open_stream_store(replace(cfg, seen_window=2 * W)).claim_layout()  # W is not part of it
        for other in (replace(cfg, n_codes=N_CODES + 2), replace(cfg, stream_len=T + 1)):
            s = open_stream_store(other)
            with pytest.raises(OnlineStoreError) as e:
                s.claim_layout()
            msg = str(e.value)
            assert f"n_codes={N_CODES}, stream_len={T}" in msg  # stored
            assert f"n_codes={other.n_codes}, stream_len={other.stream_len}" in msg  # configured
            assert "hisam tokenizer migrate" in msg
            s.close()
        first.claim_layout()  # a refused claim changed nothing
    finally:
        first.close()


def test_claim_layout_refuses_an_unreadable_record(store) -> None:
    cfg = replace(store.config, project=f"t_layout_bad_{store.config.backend}")
    s = open_stream_store(cfg)
    if cfg.backend == "redis":
        s._client.set(s._layout_key, b"\xff not json")
    else:
        s._conn().execute(f'INSERT INTO "{s._meta_t}" (name, value) VALUES (?, ?)', ("layout", "not json"))
    with pytest.raises(OnlineStoreError, match="unreadable"):
        s.claim_layout()
    s.close()


# ---- Redis timeouts ---------------------------------------------------------------------


def test_redis_that_never_answers_times_out_within_the_configured_timeout(tmp_path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        port = free_port()
        server.bind((HOST, port))
        server.listen(8)  # accepts connections (the kernel's backlog), never answers
        cfg = OnlineStoreConfig(
            backend="redis", redis_url=f"redis://{HOST}:{port}/0", repo_dir=tmp_path, redis_socket_timeout_s=0.5
        )
        t0 = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            open_stream_store(cfg)  # loads the append script: a command that gets no reply
        assert time.monotonic() - t0 < 0.5 + 1.0


def test_timeouts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="redis_socket_timeout_s"):
        OnlineStoreConfig(redis_socket_timeout_s=0)
