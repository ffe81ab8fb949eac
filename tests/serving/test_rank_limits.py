"""The Rank server's limits, its negative item cache and its bounded waits on a hung store.

Real components: the gRPC server (serving/server.py) on a TCP port, the ranker on the tiny
model's graphs in ONNX Runtime (the embedded backend: these tests are about the server and
its reads, not about Triton), and a private ``redis-server`` of this module's own that the
tests pause with SIGSTOP (it then accepts connections and never answers: a hung
dependency). The session's shared Redis is never paused. Store reads are counted by a thin
wrapper around the real store object the server reads through.

Timing assertions allow generous slack for a busy 2-core machine; each bound they check is
chosen so that the unbounded behaviour (a wait on the store's own, longer timeout) would
fail them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from features.store import ItemSids, OnlineStoreConfig, StreamAction, open_stream_store
from hisam_pb.v1 import rank_pb2, rank_pb2_grpc
from infra.services import redis_server
from serving.backends import OrtBackend
from serving.load import health_status
from serving.online import OnlineReader, store_config_for_reads
from serving.profiles import Profiles
from serving.ranking import Ranker, model_info
from serving.server import LIVENESS_SERVICE, health_deadline_s, largest_request_bytes, rank_server_thread

pytestmark = [pytest.mark.redis]

T = 20  # stream length = the tiny model's max_items
N_ITEMS = 40  # items 0..N_ITEMS-1 are in the store
USER = 7
MAX_CANDIDATES = 50
SLACK_S = 1.5  # scheduling on a loaded machine, on top of a stated bound


class CountingStore:
    """The real store, with every ``read_item_sids`` call's ids recorded."""

    def __init__(self, store) -> None:
        self._store = store
        self.item_reads: list[list[int]] = []

    def read_item_sids(self, item_ids):
        self.item_reads.append(list(item_ids))
        return self._store.read_item_sids(item_ids)

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.fixture(scope="module")
def env(model_repo, tiny_export, tmp_path_factory):
    """This module's own Redis, filled with N_ITEMS items and one user's stream."""
    cfg0 = tiny_export.model.config
    k, K = cfg0.n_sid, cfg0.codebook_size
    rng = np.random.default_rng(5)
    tokens = rng.integers(K, size=(N_ITEMS + 10, k)) + np.arange(k) * K
    with redis_server() as redis:
        cfg = OnlineStoreConfig(
            backend="redis", redis_url=redis.url, repo_dir=tmp_path_factory.mktemp("limits"), stream_len=T, n_codes=k
        )
        store = open_stream_store(cfg)
        store.put_item_sids([ItemSids(i, tuple(map(int, tokens[i])), "", 0) for i in range(N_ITEMS)])
        store.append_batch(
            [StreamAction(USER, f"lim-{t}", t, 1 + t % 6, 100 + t, tuple(map(int, tokens[t]))) for t in range(6)],
            want_history=False,
        )
        yield {"redis": redis, "cfg": cfg, "store": store, "tokens": tokens, "repo": model_repo}
        store.close()


@contextlib.contextmanager
def serve(env, *, cap_s=10.0, store_timeout_s=5.0, unknown_ttl_s=2.0, **server) -> Iterator[tuple]:
    """A Rank server on ``env``'s store: (gRPC stub, address, the counting store)."""
    counting = CountingStore(open_stream_store(store_config_for_reads(env["cfg"], store_timeout_s)))

    def make_ranker() -> Ranker:
        reader = OnlineReader(counting, unknown_ttl_s=unknown_ttl_s, read_timeout_s=store_timeout_s)
        return Ranker(
            OrtBackend(env["repo"]),
            reader,
            Profiles.empty(),
            model_info(env["repo"]),
            max_candidates=MAX_CANDIDATES,
            default_timeout_s=cap_s,
        )

    server.setdefault("health_interval_s", 0.2)
    try:
        with rank_server_thread(make_ranker, grace_s=1.0, **server) as h, grpc.insecure_channel(h.address) as ch:
            yield rank_pb2_grpc.RankingServiceStub(ch), h.address, counting
    finally:
        counting.close()


@contextlib.contextmanager
def paused(redis) -> Iterator[None]:
    """The Redis process stopped (SIGSTOP): connections are accepted, nothing is answered."""
    os.kill(redis.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis.pid, signal.SIGCONT)


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _wait_health(address: str, want: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if health_status(address, timeout_s=0.5) == want:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"health not {want} within {timeout_s}s")


def test_a_request_over_the_size_cap_is_refused_and_the_server_answers_the_next(env) -> None:
    cap = 4096
    assert largest_request_bytes(MAX_CANDIDATES) < cap  # a legitimate request always fits
    base = rank_pb2.RankRequest(user_id=USER, item_ids=list(range(1000)))

    def of_size(n: int) -> rank_pb2.RankRequest:
        for pad in range(n):
            req = rank_pb2.RankRequest(user_id=USER, item_ids=base.item_ids, request_id="x" * pad)
            if req.ByteSize() == n:
                return req
        raise AssertionError(f"no request of {n} bytes")

    with serve(env, max_receive_bytes=cap) as (stub, _, _):
        with pytest.raises(grpc.RpcError) as e:
            stub.Rank(of_size(cap + 1), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # At the cap it is parsed and judged on its content (too many candidates), not refused for its size.
        assert _code(lambda: stub.Rank(of_size(cap), timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
        ok = stub.Rank(rank_pb2.RankRequest(user_id=USER, item_ids=[3, 1, 2], request_id="after"), timeout=30)
        assert ok.request_id == "after" and [i.status for i in ok.items] == [rank_pb2.ITEM_STATUS_SCORED] * 3


def test_the_server_refuses_to_start_with_a_size_cap_below_the_largest_legitimate_request(env) -> None:
    too_small = largest_request_bytes(MAX_CANDIDATES) - 1
    with (
        pytest.raises(RuntimeError, match="below the largest legitimate request"),
        serve(env, max_receive_bytes=too_small),
    ):
        pass


def test_request_id_over_128_bytes_is_refused(env) -> None:
    with serve(env) as (stub, _, _):
        for rid in ("r" * 200, "é" * 64 + "a"):  # 200 bytes; 129 bytes in UTF-8 (65 characters)
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(rank_pb2.RankRequest(user_id=USER, item_ids=[1], request_id=rid), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in e.value.details()
        rid = "é" * 64  # exactly 128 bytes
        assert stub.Rank(rank_pb2.RankRequest(user_id=USER, item_ids=[1], request_id=rid), timeout=30).request_id == rid


def test_calls_beyond_the_concurrency_limit_are_refused_at_once(env) -> None:
    n, k = 4, 3
    with serve(env, cap_s=2.0, max_concurrent_rpcs=n) as (stub, _, _):
        req = rank_pb2.RankRequest(user_id=USER, item_ids=[1, 2])
        assert stub.Rank(req, timeout=30).items  # warm: the graphs and the connection are up
        with paused(env["redis"]):  # every admitted call now waits on the store until the 2 s cap
            t0 = time.monotonic()
            calls = [stub.Rank.future(req, timeout=30) for _ in range(n + k)]
            codes = [_code(c.result) for c in calls]
            elapsed = time.monotonic() - t0
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert refused >= k, codes
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
        assert elapsed < 2.0 + 5.0  # the admitted ones end at the server's cap, not the client's 30 s
        assert stub.Rank(req, timeout=30).items  # the slots are free again


def test_a_deadline_longer_than_the_cap_or_none_gets_the_cap(env) -> None:
    cap = 1.0
    with serve(env, cap_s=cap, store_timeout_s=20.0) as (stub, _, _):
        req = rank_pb2.RankRequest(user_id=USER, item_ids=[1, 2])
        assert stub.Rank(req, timeout=30).items
        with paused(env["redis"]):
            for client_deadline in (60.0, None):
                t0 = time.monotonic()
                with pytest.raises(grpc.RpcError) as e:
                    stub.Rank(req, timeout=client_deadline)
                took = time.monotonic() - t0
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value
                assert "cap" in e.value.details()  # the server's answer, not the client's deadline
                assert cap <= took < cap + SLACK_S + 2.0


def test_a_hung_store_is_unavailable_after_the_store_timeout(env) -> None:
    with serve(env, cap_s=30.0, store_timeout_s=1.0) as (stub, _, _):
        req = rank_pb2.RankRequest(user_id=USER, item_ids=[1, 2])
        assert stub.Rank(req, timeout=30).items
        with paused(env["redis"]):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(req, timeout=30)
            took = time.monotonic() - t0
        # The read's own bound and the client's socket timeout (set to the same 1 s by
        # store_config_for_reads) race; either way the call ends UNAVAILABLE within the bound.
        details = e.value.details()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, details
        assert "did not answer within 1s" in details or "Timeout reading" in details, details
        assert took < 1.0 + SLACK_S + 2.0


def test_health_turns_not_serving_within_the_stated_time_when_the_store_hangs_and_back(env) -> None:
    interval, probe = 0.2, 0.5
    stated = health_deadline_s(interval, probe)
    # The store's own read bound (5 s) is far above the stated time: only the probe's bound can meet it.
    with serve(env, store_timeout_s=5.0, health_interval_s=interval, health_timeout_s=probe) as (_, address, _):
        _wait_health(address, "SERVING", 30)
        with paused(env["redis"]):
            took = _wait_health(address, "NOT_SERVING", stated + 10)
            assert took <= stated + SLACK_S, f"NOT_SERVING after {took:.2f}s, stated {stated:.2f}s"
            time.sleep(2 * stated)  # still NOT_SERVING while the store hangs
            assert health_status(address) == "NOT_SERVING"
            # ... while liveness (the chart's liveness probe) stays up: a restart would not help.
            assert health_status(address, service=LIVENESS_SERVICE) == "SERVING"
        _wait_health(address, "SERVING", stated + 10)


def test_unknown_items_are_not_looked_up_again_within_the_ttl_and_become_rankable_after_it(env) -> None:
    ttl = 3.0
    new = N_ITEMS + 1  # not in the store yet
    unknown = [new, *range(1000, 1020)]
    known = [4, 5]
    with serve(env, unknown_ttl_s=ttl) as (stub, _, counting):
        req = rank_pb2.RankRequest(user_id=USER, item_ids=[*known, *unknown])
        t0 = time.monotonic()
        first = stub.Rank(req, timeout=30)
        assert sorted(x for r in counting.item_reads for x in r) == sorted(req.item_ids)
        assert [i.item_id for i in first.items if i.status == rank_pb2.ITEM_STATUS_UNKNOWN_ITEM] == unknown
        tokens = env["tokens"][new]
        env["store"].put_item_sids([ItemSids(new, tuple(map(int, tokens)), "", 0)])  # ingested after the call
        n_reads = len(counting.item_reads)
        again = stub.Rank(req, timeout=30)
        assert time.monotonic() - t0 < ttl, "too slow to observe the TTL"
        assert len(counting.item_reads) == n_reads  # no store read at all: known and unknown ids both cached
        assert {i.item_id: i.status for i in again.items}[new] == rank_pb2.ITEM_STATUS_UNKNOWN_ITEM
        time.sleep(max(t0 + ttl - time.monotonic(), 0) + 0.1)
        later = stub.Rank(req, timeout=30)
        assert sorted(counting.item_reads[-1]) == sorted(unknown)  # looked up again once the TTL passed
        assert {i.item_id: i.status for i in later.items}[new] == rank_pb2.ITEM_STATUS_SCORED


def test_the_unknown_item_cache_is_bounded(env) -> None:
    import asyncio

    async def go() -> int:
        reader = OnlineReader(open_stream_store(env["cfg"]), unknown_ttl_s=60.0, max_unknown=10)
        try:
            for start in range(10_000, 10_100, 25):
                assert await reader.item_sids(list(range(start, start + 25))) == {}
            return len(reader._unknown)
        finally:
            reader.close()
            reader.store.close()

    assert 0 < asyncio.run(go()) <= 10


def test_a_user_whose_stored_state_is_corrupt_gets_internal_naming_it_and_others_are_served(env) -> None:
    corrupt = USER + 1000
    key = env["store"]._key(corrupt)
    client = env["store"]._client
    client.hset(key, mapping={b"garbage": b"x"})  # a hash, so that the stream fields below are read
    for field in client.hkeys(env["store"]._key(USER)):
        client.hset(key, field, b"\xff\xfe not a Feast Value")
    try:
        with serve(env) as (stub, _, _):
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(rank_pb2.RankRequest(user_id=corrupt, item_ids=[1, 2]), timeout=30)
            assert e.value.code() == grpc.StatusCode.INTERNAL and str(corrupt) in e.value.details()
            assert len(stub.Rank(rank_pb2.RankRequest(user_id=USER, item_ids=[1, 2]), timeout=30).items) == 2
        # A key of another type (WRONGTYPE) is the same kind of fault, not an outage.
        client.delete(key)
        client.set(key, b"a string where a hash belongs")
        with serve(env) as (stub, address, _):
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(rank_pb2.RankRequest(user_id=corrupt, item_ids=[1, 2]), timeout=30)
            assert e.value.code() == grpc.StatusCode.INTERNAL and str(corrupt) in e.value.details()
            assert health_status(address) == "SERVING"
    finally:
        client.delete(key)


def test_bytes_that_are_no_rank_request_are_invalid_argument(env) -> None:
    """Parsed in the servicer (serving/server.py RankBytes), not by gRPC's deserializer (UNKNOWN)."""
    bad_utf8 = b"\x08\x07\x12\x01\x01\x1a\x02\xff\xfe"  # user 7, item 1, request_id: invalid UTF-8
    with serve(env) as (stub, address, _), grpc.insecure_channel(address) as ch:
        raw = ch.unary_unary("/hisam.pb.v1.RankingService/Rank")
        for garbage in (b"\xff" * 64, bad_utf8):
            with pytest.raises(grpc.RpcError) as e:
                raw(garbage, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
            assert "not a RankRequest" in e.value.details()
        assert len(stub.Rank(rank_pb2.RankRequest(user_id=USER, item_ids=[1, 2]), timeout=30).items) == 2
