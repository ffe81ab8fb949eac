"""The atomic, idempotent, bounded append on Feast's own layout (real Redis and SQLite)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from features.store import (
    ItemSids,
    OnlineStoreConfig,
    SidClaim,
    StreamAction,
    feast_read_item_sids,
    feast_read_streams,
    open_feature_store,
    open_stream_store,
)

N_CODES = 6
T = 5
W = 8  # seen window: > T, so that ids evicted from the stream are still remembered

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def backend(request, tmp_path_factory, redis_url):
    """(config, direct store, Feast store) per backend; Feast apply once per module."""
    repo = tmp_path_factory.mktemp(f"repo_{request.param}")
    cfg = OnlineStoreConfig(
        backend=request.param,
        repo_dir=repo,
        redis_url=redis_url if request.param == "redis" else None,
        project="t_online",
        stream_len=T,
        n_codes=N_CODES,
        seen_window=W,
    )
    fs = open_feature_store(cfg)
    store = open_stream_store(cfg)
    yield cfg, store, fs
    store.close()


def _action(user: int, k: int, item: int | None = None) -> StreamAction:
    item = k if item is None else item
    return StreamAction(
        user_id=user,
        event_id=f"u{user}-e{k}",
        item_id=item,
        action=k % 4,
        event_time_ms=1_700_000_000_000 + k,
        item_tokens=tuple(item * 10 + j for j in range(N_CODES)),
    )


def test_append_is_bounded_ordered_and_visible_through_feast(backend) -> None:
    _, store, fs = backend
    user = 101
    for k in range(12):
        assert store.append(_action(user, k)).appended
    (direct,) = store.read_streams([user])
    assert direct.event_ids == [f"u{user}-e{k}" for k in range(7, 12)]
    assert direct.tokens.shape == (T, N_CODES)
    np.testing.assert_array_equal(direct.tokens[:, 0], [k * 10 for k in range(7, 12)])
    np.testing.assert_array_equal(direct.actions, [k % 4 for k in range(7, 12)])
    np.testing.assert_array_equal(direct.event_times_ms, [1_700_000_000_000 + k for k in range(7, 12)])

    (via_feast,) = feast_read_streams(fs, [user], N_CODES)
    assert via_feast.event_ids == direct.event_ids
    np.testing.assert_array_equal(via_feast.tokens, direct.tokens)
    np.testing.assert_array_equal(via_feast.actions, direct.actions)
    np.testing.assert_array_equal(via_feast.event_times_ms, direct.event_times_ms)
    prof = fs.get_online_features(
        features=["user_profile:n_actions", "user_profile:last_action_ms"], entity_rows=[{"user_id": user}]
    ).to_dict()
    assert prof["n_actions"] == [12]
    assert prof["last_action_ms"] == [1_700_000_000_011]
    assert store.read_streams([999_999]) == [None]
    assert feast_read_streams(fs, [999_999], N_CODES) == [None]


def test_duplicate_event_is_not_appended_but_resampled_while_in_the_stream(backend) -> None:
    _, store, _ = backend
    user = 202
    first = [store.append(_action(user, k)) for k in range(3)]
    assert [r.history_actions.tolist() for r in first] == [[], [0], [0, 1]]
    np.testing.assert_array_equal(first[2].history_tokens[:, 0], [0, 10])
    again = store.append(_action(user, 1))
    assert again.duplicate and not again.appended and again.resampled
    # The same history as its first append: the sample a crash may have lost can be sent again.
    assert again.history_tokens_packed == first[1].history_tokens_packed
    assert again.history_actions_packed == first[1].history_actions_packed
    quiet = store.append(_action(user, 2), want_history=False)
    assert quiet.duplicate and quiet.history_actions.size == 0
    (s,) = store.read_streams([user])
    assert s.event_ids == [f"u{user}-e{k}" for k in range(3)]


@pytest.mark.parametrize("cluster_mode", [False, True])
def test_batch_append_equals_single_appends(backend, cluster_mode: bool) -> None:
    cfg, _, _ = backend
    store = open_stream_store(replace(cfg, redis_cluster=cluster_mode))
    u, v = 303 + 10 * cluster_mode, 304 + 10 * cluster_mode
    acts = [_action(u, k) for k in range(8)] + [_action(v, k) for k in range(3)] + [_action(u, 7)]
    res = store.append_batch(acts)
    assert [r.appended for r in res] == [True] * 11 + [False]
    assert [len(r.history_actions) for r in res[:8]] == [0, 1, 2, 3, 4, 5, 5, 5]
    np.testing.assert_array_equal(res[7].history_actions, [k % 4 for k in range(2, 7)])  # the last T before it
    assert res[11].resampled  # e7 again: the history before it, as the stream holds it now
    np.testing.assert_array_equal(res[11].history_actions, [k % 4 for k in range(3, 7)])
    su, sv = store.read_streams([u, v])
    assert su.event_ids == [f"u{u}-e{k}" for k in range(3, 8)]
    assert sv.event_ids == [f"u{v}-e{k}" for k in range(3)]
    store.close()


def _n_actions(fs, user: int) -> int:
    return fs.get_online_features(features=["user_profile:n_actions"], entity_rows=[{"user_id": user}]).to_dict()[
        "n_actions"
    ][0]


def test_duplicate_older_than_T_is_not_appended_again(backend) -> None:
    """The seen window is independent of T: a redelivery of ids evicted from the stream is a no-op."""
    _, store, fs = backend
    user = 606
    store.append_batch([_action(user, k) for k in range(W)])  # ids 0..7; the stream keeps 3..7
    redelivered = store.append_batch([_action(user, k) for k in range(W)])
    assert [r.duplicate for r in redelivered] == [True] * W
    # Only the ids the stream still holds can have their sample rebuilt.
    assert [r.resampled for r in redelivered] == [False] * (W - T) + [True] * T
    assert all(r.history_actions.size == 0 for r in redelivered[: W - T])
    assert [len(r.history_actions) for r in redelivered[W - T :]] == list(range(T))
    (s,) = store.read_streams([user])
    assert s.event_ids == [f"u{user}-e{k}" for k in range(W - T, W)]
    assert _n_actions(fs, user) == W  # counted once


def test_seen_window_evicts_the_oldest_ids_first(backend) -> None:
    cfg, store, fs = backend
    user = 707
    store.append_batch([_action(user, k) for k in range(W + 2)])  # ids 0, 1 fall out of the window
    res = store.append_batch([_action(user, k) for k in (2, 1, 0, W + 1)])
    # 2 is still remembered; 1 and 0 are not: appended again, they push 2 and 3 out
    assert [r.appended for r in res] == [False, True, True, False]
    # the window is now 4..9, 1, 0: 4 is remembered, 3 is not (and pushes 4 out), 5 is
    assert [r.appended for r in store.append_batch([_action(user, k) for k in (4, 3, 5, 4)])] == [
        False,
        True,
        False,
        True,
    ]
    assert _seen_ids(cfg, store, user) == [f"u{user}-e{k}" for k in (6, 7, 8, 9, 1, 0, 3, 4)]
    assert _n_actions(fs, user) == W + 2 + 4


def test_seen_window_memory_is_bounded(backend) -> None:
    cfg, store, _ = backend
    user = 808
    for start in range(0, 10 * W, 7):
        store.append_batch([_action(user, k) for k in range(start, min(start + 7, 10 * W))], want_history=False)
    assert _seen_ids(cfg, store, user) == [f"u{user}-e{k}" for k in range(9 * W, 10 * W)]  # oldest first


def _seen_ids(cfg, store, user: int) -> list[str]:
    """The ids the backend remembers for a user, oldest first, read from its own storage."""
    from features import encoding as enc

    if cfg.backend == "redis":
        (state,) = store.read_user_states([user])
        records = _bucket_records(cfg, store, user)
        # With one bucket (W <= 32), the bucket holds exactly the window: pruned on every append.
        assert [e for e, _ in records] == state.seen_ids
        return state.seen_ids
    conn = store._conn()
    ek = enc.entity_key_bytes(enc.USER_ID_KEY, user)
    return [
        e for (e,) in conn.execute(f'SELECT event_id FROM "{store._seen_t}" WHERE entity_key = ? ORDER BY seq', (ek,))
    ]


@pytest.mark.parametrize("backend", ["redis"], indirect=True)  # a property of the Redis key layout
def test_feast_reads_ignore_the_seen_window_and_cluster_keys_share_the_users_slot(backend) -> None:
    """Nothing beyond the user's own hash is written (Redis): one key, so one Cluster slot."""
    cfg, store, fs = backend
    assert cfg.backend == "redis"
    from features import encoding as enc

    user = 125  # 0x7d: Feast's key holds a '}' byte, so no hash tag could follow it
    before = set(store._client.keys(b"*"))
    store.append_batch([_action(user, k) for k in range(3)])
    assert set(store._client.keys(b"*")) - before <= {enc.redis_key(cfg.project, enc.USER_ID_KEY, user)}
    (s,) = feast_read_streams(fs, [user], N_CODES)
    assert s.event_ids == [f"u{user}-e{k}" for k in range(3)]


def _bucket_records(cfg, store, user: int) -> list[tuple[str, int]]:
    """Redis: every (event id, seq) record of the user's seen-window buckets, by seq."""
    from features import encoding as enc
    from features.store.base import seen_records

    key = enc.redis_key(cfg.project, enc.USER_ID_KEY, user)
    fields = store._client.hgetall(key)
    assert int(fields[b"_hisam:user_stream:seen_b"]) == cfg.seen_buckets
    records = [r for f, v in fields.items() if f.startswith(b"_hisam:user_stream:seen:") for r in seen_records(v)]
    return sorted(records, key=lambda r: r[1])


def test_a_stream_without_a_window_counts_its_ids_as_seen(backend) -> None:
    """A stream written through Feast (a push, or write_to_online_store) keeps no window:
    its ids count as seen, and start the window on the user's first append."""
    cfg, store, _ = backend
    from features import encoding as enc

    user = 909
    store.append_batch([_action(user, k) for k in range(3)])
    if cfg.backend == "redis":
        key = enc.redis_key(cfg.project, enc.USER_ID_KEY, user)
        window = [f for f in store._client.hkeys(key) if f.startswith(b"_hisam:user_stream:seen")]
        store._client.hdel(key, *window)
    else:
        conn = store._conn()
        conn.execute(
            f'DELETE FROM "{store._seen_t}" WHERE entity_key = ?', (enc.entity_key_bytes(enc.USER_ID_KEY, user),)
        )
    assert [r.appended for r in store.append_batch([_action(user, k) for k in range(4)])] == [False] * 3 + [True]
    assert _seen_ids(cfg, store, user) == [f"u{user}-e{k}" for k in range(4)]


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_window_buckets_stay_small_and_follow_a_change_of_W(backend) -> None:
    """Redis: an append rewrites one bucket of about W / 32 ids; a store opened with another
    W rebuckets a user's window on first touch, keeping what it remembers."""
    cfg, _, _ = backend
    wide = replace(cfg, seen_window=128)  # 4 buckets
    store = open_stream_store(wide)
    user = 1010
    ids = list(range(10 * 128))
    for start in range(0, len(ids), 50):
        store.append_batch([_action(user, k) for k in ids[start : start + 50]], want_history=False)
    records = _bucket_records(wide, store, user)
    remembered = [e for e, seq in records if seq > len(ids) - 128]
    assert remembered == [f"u{user}-e{k}" for k in ids[-128:]]
    # Forgotten ids linger only in buckets not written since: far fewer than the window.
    assert len(records) - len(remembered) < 128 // 2
    assert store.read_user_states([user])[0].seen_ids == remembered
    store.close()

    narrow = open_stream_store(replace(cfg, seen_window=16))  # 1 bucket
    assert narrow.read_user_states([user])[0].seen_ids == remembered[-16:]  # before any rebucketing
    res = narrow.append_batch([_action(user, k) for k in (ids[-1], ids[-16], ids[-17], 10_000)])
    assert [r.appended for r in res] == [False, False, True, True]
    assert [e for e, _ in _bucket_records(replace(cfg, seen_window=16), narrow, user)] == [
        f"u{user}-e{k}" for k in [*ids[-14:], ids[-17], 10_000]
    ]
    narrow.close()


def test_two_concurrent_writers_on_one_user_lose_nothing(backend) -> None:
    cfg, _, _ = backend
    wide = replace(cfg, stream_len=1000)  # keep every append visible
    user, per_writer = 404, 150

    def writer(w: int) -> None:
        store = open_stream_store(wide)  # each writer its own client / connection
        try:
            for k in range(per_writer):
                a = _action(user, w * 10_000 + k, item=k)
                if k % 5 == 0:
                    store.append_batch([a, replace(a, event_id=a.event_id + "b")])
                else:
                    store.append(a)
        finally:
            store.close()

    with ThreadPoolExecutor(2) as pool:
        for fut in [pool.submit(writer, w) for w in (1, 2)]:
            fut.result()  # re-raises a writer's error here
    (s,) = open_stream_store(wide).read_streams([user])
    expected = per_writer + per_writer // 5
    assert len(s.event_ids) == len(set(s.event_ids)) == 2 * expected
    for w in (1, 2):  # each writer's own order is kept
        mine = [e for e in s.event_ids if e.startswith(f"u{user}-e{w}")]
        assert len(mine) == expected
        ks = [int(e.split("-e")[1].rstrip("b")) for e in mine]
        assert ks == sorted(ks)


def test_item_sids_readable_through_feast_and_directly(backend) -> None:
    _, store, fs = backend
    store.put_item_sids([ItemSids(item_id=77, tokens=(1, 2, 3, 4, 5, 6), tokenizer_version="tok-v1", event_time_ms=0)])
    assert feast_read_item_sids(fs, [77, 78]) == {77: [1, 2, 3, 4, 5, 6], 78: None}
    direct = store.read_item_sids([77, 78])
    assert list(direct) == [77]
    assert direct[77] == ItemSids(item_id=77, tokens=(1, 2, 3, 4, 5, 6), tokenizer_version="tok-v1", event_time_ms=0)


def test_item_id_claims_give_each_item_its_first_free_candidate(backend) -> None:
    _, store, _ = backend
    a, b, c = (SidClaim(item, (1, 2), (3, 4, 5)) for item in (501, 502, 503))
    assert store.claim_item_sids([a, b]) == [(1, 2, 3), (1, 2, 4)]  # in order: b finds 3 taken
    assert store.claim_item_sids([b, a]) == [(1, 2, 4), (1, 2, 3)]  # sent again: each keeps its ID
    changed = SidClaim(501, (9, 9), (9,))  # item 501 again with other features: it keeps its ID
    assert store.claim_item_sids([changed, c]) == [(1, 2, 3), (1, 2, 5)]
    assert store.claim_item_sids([SidClaim(504, (1, 2), (3, 4))]) == [None]  # both are others'
    assert store.claim_item_sids([SidClaim(504, (9, 9), (9,))]) == [(9, 9, 9)]  # not held by 501
    assert store.claim_item_sids([]) == []


def test_concurrent_claims_never_share_an_id(backend) -> None:
    cfg, _, _ = backend
    last = tuple(range(64))

    def claimer(w: int) -> list[tuple[int, ...] | None]:
        store = open_stream_store(cfg)  # each writer its own client / connection
        try:
            return [store.claim_item_sids([SidClaim(10_000 * w + k, (7, 7), last)])[0] for k in range(30)]
        finally:
            store.close()

    with ThreadPoolExecutor(2) as pool:
        got = [x for fut in [pool.submit(claimer, w) for w in (1, 2)] for x in fut.result()]
    assert None not in got and len(set(got)) == 60


def test_invalid_actions_are_rejected_before_any_write(backend) -> None:
    _, store, _ = backend
    with pytest.raises(ValueError, match="tokens"):
        store.append(replace(_action(505, 0), item_tokens=(1, 2)))
    with pytest.raises(ValueError, match="event_id"):
        store.append(replace(_action(505, 0), event_id="a\x00b"))
    assert store.read_streams([505]) == [None]
