"""Rank end to end: real Triton + real gRPC server + an online store written by the stream agents.

The stream worker runs as a real process on the real broker: it tokenizes item events with a
trained tiny DST tokenizer and appends user actions to Redis. The Rank server (in a thread,
talking real gRPC on a TCP port) reads that store and scores on a real ``tritonserver``
(Python backend running ONNX Runtime) serving the three graphs of a tiny scrambled HMAT.

Reference: PyTorch's ``rank_candidates`` on the same weights, with the history rebuilt from
the events this test produced (items, actions via ``label_of``) and the items' codes as the
stream stored them. Tolerance: 1e-4 absolute (Triton runs ONNX Runtime, so this is the ONNX
vs PyTorch tolerance of tests/export/test_hmat_export.py, whose docstring explains it);
cached vs full recompute through Triton: 1e-5 (the same ONNX Runtime, summation order only).
Request order: exactly equal (serving sorts candidates before building the stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
import time
import uuid

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from features.actions import label_of
from features.store import ItemSids, OnlineStoreConfig, StreamAction, open_stream_store
from hisam_pb.v1 import rank_pb2, rank_pb2_grpc
from infra.services import redis_server
from models.hmat.inference import rank_candidates
from models.hmat.sequence import UserSequence, build_stream
from serving.backends import TritonBackend
from serving.load import health_status
from serving.online import OnlineReader
from serving.profiles import Profiles
from serving.ranking import Ranker, model_info
from serving.repository import publish_version
from serving.server import SERVICE_NAME, health_deadline_s, rank_server_thread
from stream import producer as prod
from stream import records as rec
from stream import topics as tp
from stream.testing import WorkerProcess, wait_until

pytestmark = [pytest.mark.triton, pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]

ATOL = 1e-4
CACHE_ATOL = 1e-5
T = 20  # stream length kept by the store = the tiny model's max_items
PROFILE = (1, 2)
MAX_CANDIDATES = 50
RUN = uuid.uuid4().hex[:8]
BASE = (int(time.time()) % 100_000) * 10_000 + 5_000_000  # ids unique per run (a shared Redis may hold others)
N_ITEMS = 40
WARM_USERS = (BASE + 1, BASE + 2)
COLD_USER = BASE + 99


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from recipes.tokenizer.testing import tiny_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer(out, n_items=128, epochs=2)
    return out


@pytest.fixture(scope="module")
def env(kafka_bootstrap, redis_url, tokenizer_dir, tiny_export, restamp, restartable_triton, tmp_path_factory):
    from models.tokenizer import FrozenTokenizer
    from recipes.tokenizer.testing import synthetic_items

    tok = FrozenTokenizer.load(tokenizer_dir)
    assert tok.codebook_size == tiny_export.model.config.codebook_size and tok.n_codes == 6
    work = tmp_path_factory.mktemp("rank_e2e")
    # A namespace of this module's own on the session's Redis: the worker records its layout
    # and its applied offsets per namespace (features/store), other modules use other T.
    cfg = OnlineStoreConfig(
        backend="redis",
        redis_url=redis_url,
        repo_dir=work / "feature_repo",
        project=f"t_rank_{RUN}",
        stream_len=T,
        n_codes=6,
    )
    tp.ensure_topics(kafka_bootstrap, tp.default_topics(4))
    worker = WorkerProcess(
        [
            "--bootstrap", kafka_bootstrap, "--backend", "redis", "--redis-url", redis_url,
            "--repo-dir", str(cfg.repo_dir), "--project", cfg.project, "--stream-len", str(T), "--n-codes", "6",
            "--tokenizer", str(tokenizer_dir), "--app-id", f"hisam-rank-{RUN}", "--within-ms", "20",
            "--session-timeout", "6", "--instance-id", f"rank-{RUN}",
        ],
        work / "worker.log",
    )  # fmt: skip
    worker.start()
    store = open_stream_store(cfg)
    producer = prod.make_producer(kafka_bootstrap, linger_ms=2)
    feats, _, _ = synthetic_items(N_ITEMS, tok.modalities, seed=3)
    items = [BASE + i for i in range(N_ITEMS)]
    prod.produce_items(
        producer,
        [rec.item_event(it, {m: feats[m][i] for m in tok.modalities}, 1_700_000_000_000) for i, it in enumerate(items)],
    )
    events = {u: [] for u in WARM_USERS}
    for k in range(12 + 25):  # the second user passes T: the store keeps its last T
        for n, u in enumerate(WARM_USERS):
            if n == 0 and k >= 12:
                continue
            ev = rec.action_event(
                f"{RUN}-{u}-{k}", u, items[(k * 7 + n * 3) % N_ITEMS], 1 + (k + n) % 6, 1_700_000_000_000 + k
            )
            events[u].append(ev)
    wait_until(lambda: len(store.read_item_sids(items)) == N_ITEMS, 60, 0.1, "item ingestion")
    prod.produce_actions(producer, [e for evs in events.values() for e in evs])
    wait_until(
        lambda: all(s is not None and s.event_ids[-1] == events[u][-1].event_id for u, s in zip(WARM_USERS, store.read_streams(WARM_USERS))),
        60, 0.1, "action appends",
    )  # fmt: skip

    repo = work / "model_repo"
    publish_version(repo, restamp(tiny_export.graphs, tokenizer_version=tok.version))
    triton = restartable_triton(repo)

    def make_ranker() -> Ranker:
        return Ranker(
            TritonBackend(triton.server.url),
            OnlineReader(open_stream_store(cfg)),
            Profiles(None, PROFILE),
            model_info(repo),
            max_candidates=MAX_CANDIDATES,
        )

    with rank_server_thread(make_ranker, health_interval_s=0.2, reflection=True) as handle:
        channel = grpc.insecure_channel(handle.address)
        yield {
            "stub": rank_pb2_grpc.RankingServiceStub(channel),
            "channel": channel,
            "store": store,
            "cfg": cfg,
            "items": items,
            "events": events,
            "producer": producer,
            "triton": triton,
            "repo": repo,
            "tok": tok,
            "model": tiny_export.model,
            "make_ranker": make_ranker,
        }
        channel.close()
    triton.stop()
    producer.close()
    worker.stop()
    store.close()


def _codes(env, item_ids) -> np.ndarray:
    sids = env["store"].read_item_sids(list(item_ids))
    return np.stack([np.asarray(sids[i].tokens) - np.arange(6) * 16 for i in item_ids])  # (N, k) local codes


def _reference(env, user: int, item_ids, history_events=None) -> dict[int, float]:
    """PyTorch scores of ``item_ids`` for ``user`` from the events the test produced."""
    evs = (env["events"].get(user, []) if history_events is None else history_events)[-T:]
    hist = _codes(env, [e.item_id for e in evs]) if evs else np.zeros((0, 6), np.int64)
    actions = [int(label_of(e.action)) for e in evs]
    seq = UserSequence(
        list(PROFILE),
        torch.from_numpy(hist),
        torch.tensor(actions, dtype=torch.long),
        torch.from_numpy(_codes(env, item_ids)),
    )
    scores = rank_candidates(env["model"], build_stream([seq], env["model"].config.layout))[0]
    return dict(zip(item_ids, scores.tolist(), strict=True))


def _scores(resp: rank_pb2.RankResponse) -> dict[int, float]:
    return {it.item_id: it.score for it in resp.items if it.status == rank_pb2.ITEM_STATUS_SCORED}


def _rank(env, user: int, items, timeout: float = 30.0) -> rank_pb2.RankResponse:
    return env["stub"].Rank(rank_pb2.RankRequest(user_id=user, item_ids=list(items), request_id="t"), timeout=timeout)


def _assert_close(got: dict[int, float], want: dict[int, float], atol: float) -> None:
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[i] for i in want], list(want.values()), atol=atol, rtol=0)


def test_scores_equal_pytorch_sorted_with_model_version_and_cache(env) -> None:
    user, cands = WARM_USERS[0], env["items"][5:25]
    first = _rank(env, user, cands)
    second = _rank(env, user, cands)
    want = _reference(env, user, cands)
    assert first.history_len == 12 and not first.cache_hit and second.cache_hit
    assert first.model_version.startswith("hmat-") and first.request_id == "t"
    _assert_close(_scores(first), want, ATOL)
    assert _scores(second) == _scores(first)  # hit and miss both score against the same cache
    got = [it.score for it in first.items]
    assert got == sorted(got, reverse=True) and len(first.items) == len(cands)


def test_history_beyond_t_is_bounded_and_matches_pytorch(env) -> None:
    user, cands = WARM_USERS[1], env["items"][:30]
    resp = _rank(env, user, cands)
    assert resp.history_len == T
    _assert_close(_scores(resp), _reference(env, user, cands), ATOL)


def test_cached_path_equals_full_recompute_through_triton(env) -> None:
    cands = env["items"][10:40]

    async def both() -> tuple:
        full = env["make_ranker"]()
        full.cache = None
        cached = env["make_ranker"]()
        try:
            return await full.rank(WARM_USERS[1], cands), await cached.rank(WARM_USERS[1], cands)
        finally:
            await full.backend.close()
            await cached.backend.close()

    full, cached = asyncio.run(both())
    a = {i.item_id: i.score for i in full.items}
    b = {i.item_id: i.score for i in cached.items}
    _assert_close(b, a, CACHE_ATOL)
    assert full.model_version == cached.model_version


def test_candidate_order_does_not_change_any_score(env) -> None:
    cands = env["items"][:20]
    base = _scores(_rank(env, WARM_USERS[0], cands))
    for seed in range(3):
        shuffled = cands[:]
        random.Random(seed).shuffle(shuffled)
        assert _scores(_rank(env, WARM_USERS[0], shuffled)) == base
    subset = _scores(_rank(env, WARM_USERS[0], cands[3:9]))  # other neighbours: same score up to rounding
    _assert_close(subset, {i: base[i] for i in cands[3:9]}, CACHE_ATOL)


def test_cold_user_is_scored_from_profile_only(env) -> None:
    cands = env["items"][:10]
    resp = _rank(env, COLD_USER, cands)
    assert resp.history_len == 0
    _assert_close(_scores(resp), _reference(env, COLD_USER, cands, history_events=[]), ATOL)


def test_unknown_and_foreign_tokenizer_items_are_reported_not_scored(env) -> None:
    foreign = BASE + 7777
    env["store"].put_item_sids([ItemSids(foreign, tuple(range(0, 96, 16)), "another-tokenizer", 0)])
    unknown = BASE + 8888
    cands = [unknown, *env["items"][:5], foreign]
    resp = _rank(env, WARM_USERS[0], cands)
    status = {it.item_id: it.status for it in resp.items}
    assert status[unknown] == rank_pb2.ITEM_STATUS_UNKNOWN_ITEM
    assert status[foreign] == rank_pb2.ITEM_STATUS_TOKENIZER_MISMATCH
    assert [it.item_id for it in resp.items[-2:]] == [unknown, foreign]  # unscored last, in request order
    _assert_close(_scores(resp), _reference(env, WARM_USERS[0], env["items"][:5]), ATOL)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "no candidates"),
        ([1, 2, 1], "duplicate item ids: [1]"),
        (list(range(MAX_CANDIDATES + 1)), "more than the limit"),
        ([3, -4], "non-negative"),
    ],
)
def test_bad_requests_are_invalid_argument(env, items, message) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _rank(env, WARM_USERS[0], items)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_deadline_is_honoured(env) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _rank(env, COLD_USER + 1, env["items"][:30], timeout=0.001)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_health_and_reflection(env) -> None:
    health = health_pb2_grpc.HealthStub(env["channel"])
    for name in ("", SERVICE_NAME):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
        )
    refl = reflection_pb2_grpc.ServerReflectionStub(env["channel"])
    (resp,) = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert SERVICE_NAME in {s.name for s in resp.list_services_response.service}


def test_new_action_reaches_the_next_rank_and_invalidates_the_cache(env) -> None:
    user, cands = WARM_USERS[0], env["items"][20:30]
    before = _rank(env, user, cands)
    _rank(env, user, cands)  # cached now
    ev = rec.action_event(f"{RUN}-{user}-new", user, env["items"][33], 3, 1_700_000_100_000)
    prod.produce_actions(env["producer"], [ev])
    env["events"][user].append(ev)
    after = wait_until(
        lambda: (r := _rank(env, user, cands)).history_len == before.history_len + 1 and r, 30, 0.05, "the new action"
    )
    assert not after.cache_hit
    _assert_close(_scores(after), _reference(env, user, cands), ATOL)


def test_new_model_version_is_picked_up_and_drops_the_cache(env, tiny_export, restamp) -> None:
    cands = env["items"][:8]
    old = _rank(env, WARM_USERS[1], cands)
    assert _rank(env, WARM_USERS[1], cands).cache_hit
    pv = publish_version(
        env["repo"], restamp(tiny_export.graphs, tokenizer_version=env["tok"].version, model_version="hmat-rolled")
    )
    assert pv.version == 2
    # Triton loads the three models one by one: until all serve version 2, a request may be
    # encoded by one version and scored by the other, which the server detects and recomputes.
    first = wait_until(
        lambda: (r := _rank(env, WARM_USERS[1], cands)).model_version == "hmat-rolled" and r, 60, 0.1, "v2"
    )
    assert not first.cache_hit  # the old version's cache is not used for the new model
    resp = wait_until(lambda: (r := _rank(env, WARM_USERS[1], cands)).cache_hit and r, 60, 0.1, "a cache of version 2")
    assert resp.model_version == "hmat-rolled" != old.model_version
    _assert_close(_scores(resp), _scores(old), CACHE_ATOL)  # same weights, new version


def test_a_hung_triton_turns_health_not_serving_and_calls_end_at_the_cap(env) -> None:
    """Triton paused (SIGSTOP: it accepts connections, answers nothing): bounded probes and calls."""
    cap, interval, probe = 1.0, 0.2, 0.5
    cands = env["items"][:5]
    req = rank_pb2.RankRequest(user_id=WARM_USERS[0], item_ids=cands)

    def make_ranker() -> Ranker:
        return Ranker(
            TritonBackend(env["triton"].server.url),
            OnlineReader(open_stream_store(env["cfg"])),
            Profiles(None, PROFILE),
            model_info(env["repo"]),
            default_timeout_s=cap,
        )

    def health_is(address: str, want: str) -> bool:
        return health_status(address, timeout_s=0.5) == want

    server = {"health_interval_s": interval, "health_timeout_s": probe}
    with rank_server_thread(make_ranker, **server) as h, grpc.insecure_channel(h.address) as ch:
        stub = rank_pb2_grpc.RankingServiceStub(ch)
        want = _scores(stub.Rank(req, timeout=30))
        wait_until(lambda: health_is(h.address, "SERVING"), 30, 0.05, "SERVING")
        os.kill(env["triton"].server.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(req, timeout=60)  # longer than the server's cap
            took = time.monotonic() - t0
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "cap" in e.value.details()
            assert took < cap + 3.0
            t0 = time.monotonic()
            wait_until(lambda: health_is(h.address, "NOT_SERVING"), 30, 0.05, "NOT_SERVING")
            assert time.monotonic() - t0 <= health_deadline_s(interval, probe) + 1.5
        finally:
            os.kill(env["triton"].server.pid, signal.SIGCONT)
        wait_until(lambda: health_is(h.address, "SERVING"), 30, 0.05, "SERVING again")
        _assert_close(_scores(stub.Rank(req, timeout=30)), want, CACHE_ATOL)
    wait_until(lambda: _try_rank(env, COLD_USER, cands), 30, 0.2, "the module's server answering")


def test_triton_down_is_unavailable_and_the_server_recovers(env) -> None:
    cands = env["items"][:5]
    want = _scores(_rank(env, COLD_USER, cands))
    env["triton"].stop()
    with pytest.raises(grpc.RpcError) as e:
        _rank(env, COLD_USER, cands)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "Triton" in e.value.details()
    health = health_pb2_grpc.HealthStub(env["channel"])
    wait_until(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.NOT_SERVING,
        10, 0.1, "NOT_SERVING",
    )  # fmt: skip
    env["triton"].start()
    got = wait_until(lambda: _try_rank(env, COLD_USER, cands), 30, 0.2, "recovery")
    _assert_close(_scores(got), want, CACHE_ATOL)


def _try_rank(env, user, items):
    try:
        return _rank(env, user, items)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None


def test_online_store_down_is_unavailable_and_the_server_recovers(env) -> None:
    """A private Redis that this test stops and restarts on the same port (non-persistent: data re-written)."""
    cands = env["items"][:4]
    codes = env["store"].read_item_sids(cands)
    with contextlib.ExitStack() as stack:
        r = stack.enter_context(redis_server())
        cfg = dataclasses.replace(env["cfg"], redis_url=r.url)

        def fill() -> None:
            s = open_stream_store(cfg)
            s.put_item_sids(list(codes.values()))
            s.append(StreamAction(1, "e1", cands[0], 3, 1, codes[cands[0]].tokens), want_history=False)
            s.close()

        fill()

        def make_ranker() -> Ranker:
            return Ranker(
                TritonBackend(env["triton"].server.url),
                OnlineReader(open_stream_store(cfg), item_ttl_s=0.0),
                Profiles(None, PROFILE),
                model_info(env["repo"]),
            )

        with rank_server_thread(make_ranker) as handle, grpc.insecure_channel(handle.address) as ch:
            stub = rank_pb2_grpc.RankingServiceStub(ch)
            req = rank_pb2.RankRequest(user_id=1, item_ids=cands)
            ok = stub.Rank(req, timeout=30)
            assert ok.history_len == 1
            stack.close()  # Redis stops
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(req, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "online store" in e.value.details()
            with redis_server(port=r.port):
                fill()
                again = wait_until(lambda: _try_stub(stub, req), 30, 0.2, "recovery")
                assert _scores(again) == _scores(ok)


def _try_stub(stub, req):
    try:
        return stub.Rank(req, timeout=30)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None
