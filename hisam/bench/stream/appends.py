"""In this process, no broker: the store's atomic append against Feast's only way to append
(read-modify-write), and reading full streams through Feast against the direct path."""

from __future__ import annotations

import time

from hisam.bench.stream.common import N_CODES, actions


def bench_store_appends(cfg, n: int, users: int, items: int) -> float:
    """Appends/s of ``append_batch`` (500 per call) in this process."""
    from features.store import StreamAction, open_stream_store

    store = open_stream_store(cfg)
    evs = actions(n, users, items, tag=f"store-{cfg.backend}")
    acts = [
        StreamAction(
            e.user_id + 10_000_000,
            e.event_id,
            e.item_id,
            e.action,
            e.event_time_ms,
            tuple(range(e.item_id, e.item_id + N_CODES)),
        )
        for e in evs
    ]
    t0 = time.perf_counter()
    for s in range(0, n, 500):
        store.append_batch(acts[s : s + 500])
    rate = n / (time.perf_counter() - t0)
    store.close()
    return rate


def bench_feast_rmw(fs, n: int, users: int, items: int) -> float:
    """Appends/s done through Feast alone: read the streams, append in Python, write back."""
    import pandas as pd

    from features import encoding as enc

    evs = actions(n, users, items, tag="feast")
    refs = [f"{enc.USER_STREAM_FV}:{f}" for f in enc.STREAM_FEATURES]
    t0 = time.perf_counter()
    for s in range(0, n, 500):
        batch = evs[s : s + 500]
        uids = sorted({e.user_id + 20_000_000 for e in batch})
        cur = fs.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in uids]).to_dict()
        state = {u: {f: list(cur[f][i] or []) for f in enc.STREAM_FEATURES} for i, u in enumerate(uids)}
        for e in batch:
            st = state[e.user_id + 20_000_000]
            st["sid_tokens"] = (st["sid_tokens"] + list(range(e.item_id, e.item_id + N_CODES)))[-300 * N_CODES :]
            st["actions"] = (st["actions"] + [e.action])[-300:]
            st["event_ids"] = (st["event_ids"] + [e.event_id])[-300:]
            st["event_times_ms"] = (st["event_times_ms"] + [e.event_time_ms])[-300:]
        ts = pd.Timestamp(time.time(), unit="s", tz="UTC")
        df = pd.DataFrame([{"user_id": u, **st, "event_timestamp": ts} for u, st in state.items()])
        fs.write_to_online_store(enc.USER_STREAM_FV, df)
    return n / (time.perf_counter() - t0)


def bench_reads(cfg, fs, n_users: int = 64, reps: int = 20) -> dict:
    """Latency of reading 64 full streams: Feast ``get_online_features`` vs the direct path."""
    from features.store import StreamAction, feast_read_streams, open_stream_store

    store = open_stream_store(cfg)
    base = 30_000_000
    acts = [
        StreamAction(base + u, f"read-{u}-{k}", k, 1, 1_700_000_000_000 + k, tuple(range(k, k + N_CODES)))
        for u in range(n_users)
        for k in range(cfg.stream_len)
    ]
    for s in range(0, len(acts), 1000):
        store.append_batch(acts[s : s + 1000], want_history=False)
    uids = [base + u for u in range(n_users)]
    feast_read_streams(fs, uids, N_CODES)
    store.read_streams(uids)  # warm both
    t0 = time.perf_counter()
    for _ in range(reps):
        feast_read_streams(fs, uids, N_CODES)
    feast_ms = (time.perf_counter() - t0) / reps * 1000
    t0 = time.perf_counter()
    for _ in range(reps):
        store.read_streams(uids)
    direct_ms = (time.perf_counter() - t0) / reps * 1000
    store.close()
    return {"feast_ms": feast_ms, "direct_ms": direct_ms, "speedup": feast_ms / direct_ms}
