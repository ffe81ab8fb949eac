"""Triton stops under traffic: Rank fails fast and as documented, then recovers by itself.

Real components only: ``tritonserver`` on the tiny model's repository, ``hisam serve`` as its
own process on a SQLite online store, and client threads calling Rank over gRPC the whole
time. The documented behaviour (serving/server.py) is what is asserted:

- while Triton is down every call ends UNAVAILABLE, naming Triton, within seconds (no call
  waits for its 20 s deadline), and health turns NOT_SERVING;
- nothing else ever comes back (no INTERNAL, no DEADLINE_EXCEEDED, no made-up scores);
- when Triton is back, the same server process (same pid, never restarted) turns SERVING and
  answers every later call, with the scores it gave before the outage;
- the server's metrics agree with what the clients saw, call for call.

The embedded Triton of ``hisam serve`` (no ``--triton-url``) is killed outright in the second
test: its supervisor restarts it and Rank recovers with nobody's help.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import psutil
import pytest

from hisam_pb.v1 import rank_pb2, rank_pb2_grpc
from infra.ports import free_port
from serving.load import check_answer, health_status, serve_process, wait_health

pytestmark = [pytest.mark.triton, pytest.mark.slow]

DEADLINE_S = 20.0  # the clients' deadline: a call that hangs shows up as DEADLINE_EXCEEDED
FAST_S = 5.0  # an UNAVAILABLE answer comes in milliseconds; this only catches a hang


@dataclass
class Outcome:
    start: float  # time.monotonic()
    end: float
    index: int  # into the request list
    code: str
    details: str = ""
    scores: dict[int, float] = field(default_factory=dict)
    malformed: str | None = None


class Traffic:
    """``clients`` threads calling Rank back to back until ``stop``; every outcome kept."""

    def __init__(self, address: str, requests, clients: int = 4) -> None:
        self.address, self.requests = address, requests
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(c, clients), daemon=True) for c in range(clients)]

    def _client(self, c: int, clients: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = rank_pb2_grpc.RankingServiceStub(channel)
            n = c
            while not self._stop.is_set():
                k = n % len(self.requests)
                user, items = self.requests[k]
                rid = f"r{c}-{n}"
                n += clients
                t0 = time.monotonic()
                try:
                    resp = stub.Rank(
                        rank_pb2.RankRequest(user_id=user, item_ids=items, request_id=rid), timeout=DEADLINE_S
                    )
                    out = Outcome(t0, time.monotonic(), k, "OK", scores={i.item_id: i.score for i in resp.items})
                    out.malformed = check_answer(self.requests[k], rid, resp)
                except grpc.RpcError as e:
                    out = Outcome(t0, time.monotonic(), k, e.code().name, e.details() or "")
                with self._lock:
                    self.outcomes.append(out)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(DEADLINE_S + 10)

    def count(self, code: str, since: float = 0.0) -> int:
        with self._lock:
            return sum(o.code == code and o.start >= since for o in self.outcomes)

    def wait_for(self, code: str, n: int, since: float, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count(code, since) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {n} {code} answers after {timeout_s:.0f}s: {self.summary()}")
            time.sleep(0.05)

    def summary(self) -> dict[str, int]:
        with self._lock:
            codes = [o.code for o in self.outcomes]
        return {c: codes.count(c) for c in set(codes)}


def _metric(page: dict, name: str, **labels: str) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def _assert_same_scores(outcomes: list[Outcome], reference: dict[int, dict[int, float]]) -> int:
    """Every OK answer scores its request as the first answer to that request did (same model and input)."""
    checked = 0
    for o in outcomes:
        if o.code == "OK" and o.index in reference:
            want = reference[o.index]
            assert o.scores.keys() == want.keys()
            # cache hit and miss score the same cache; 1e-5 covers a full-recompute fallback
            np.testing.assert_allclose([o.scores[i] for i in want], list(want.values()), atol=1e-5, rtol=0)
            checked += 1
    return checked


def test_triton_stopped_mid_traffic_is_unavailable_fast_and_rank_recovers_without_restart(
    model_repo, sqlite_store, restartable_triton, scrape, tmp_path
) -> None:
    triton = restartable_triton(model_repo, tmp_path / "triton")
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    args = ["--model-repo", str(model_repo), "--triton-url", triton.server.url, "--health-interval", "0.2"]
    args += ["--metrics-port", str(metrics_port), *sqlite_store.args]
    try:
        with serve_process(args, tmp_path / "serve.log") as served:
            pid = served.proc.pid
            traffic = Traffic(served.address, sqlite_store.requests)
            traffic.start()
            try:
                traffic.wait_for("OK", 80, 0.0, 120)  # every request answered once, for the score check

                t_stop = time.monotonic()
                triton.stop()  # SIGTERM: Triton drains what it has, then exits
                t_stopped = time.monotonic()
                wait_health(served.address, "NOT_SERVING", 15)
                traffic.wait_for("UNAVAILABLE", 10, t_stopped, 30)
                down = scrape(metrics_url)
                assert _metric(down, "hisam_serving_dependency_up", dependency="backend") == 0
                assert _metric(down, "hisam_serving_dependency_up", dependency="store") == 1

                triton.start()  # same repository, same ports
                wait_health(served.address, "SERVING", 60)
                t_serving = time.monotonic()
                traffic.wait_for("OK", 40, t_serving, 120)
            finally:
                traffic.stop()
            assert served.proc.poll() is None and served.proc.pid == pid  # never restarted
            after = scrape(metrics_url)
            log_tail = served.log_tail()
    finally:
        triton.stop()

    outcomes = traffic.outcomes
    summary = traffic.summary()
    # Only the two documented outcomes, ever.
    kinds = {(o.code, o.details[:150]) for o in outcomes if o.code not in ("OK", "UNAVAILABLE")}
    assert set(summary) == {"OK", "UNAVAILABLE"}, (summary, sorted(kinds)[:10])
    bad = [o for o in outcomes if o.malformed]
    assert not bad, bad[:3]
    unavailable = [o for o in outcomes if o.code == "UNAVAILABLE"]
    url = triton.server.url
    assert all(f"Triton at {url} unavailable" in o.details for o in unavailable), unavailable[0].details
    # Fast: no error waited for anything like the deadline.
    slowest = max(o.end - o.start for o in unavailable)
    assert slowest < FAST_S, f"an UNAVAILABLE took {slowest:.1f}s"
    # The outage is the only time anything failed: before the stop and after SERVING, all OK.
    assert all(o.code == "OK" for o in outcomes if o.end < t_stop), "a call failed before Triton stopped"
    assert all(o.code == "OK" for o in outcomes if o.start >= t_serving), "a call failed after recovery"
    # The same scores before and after the outage.
    first: dict[int, dict[int, float]] = {}
    for o in sorted((o for o in outcomes if o.code == "OK" and o.end < t_stop), key=lambda o: o.end):
        first.setdefault(o.index, o.scores)
    assert _assert_same_scores([o for o in outcomes if o.start >= t_serving], first) > 0
    # The server counted exactly what the clients saw.
    for code in ("OK", "UNAVAILABLE"):
        got = _metric(after, "hisam_serving_rank_requests_total", code=code)
        assert got == summary[code], (code, got, summary, log_tail)
    assert _metric(after, "hisam_serving_dependency_up", dependency="backend") == 1
    failed_calls = sum(
        v for (name, labels), v in after.items() if name == "hisam_serving_backend_errors_total" and ("kind", "unavailable") in labels
    )  # fmt: skip
    assert failed_calls >= summary["UNAVAILABLE"]  # every UNAVAILABLE Rank came from a failed Triton call


def test_embedded_triton_killed_is_restarted_and_rank_recovers(model_repo, sqlite_store, tmp_path) -> None:
    args = ["--model-repo", str(model_repo), "--health-interval", "0.2", *sqlite_store.args]
    user, items = sqlite_store.requests[0]
    request = rank_pb2.RankRequest(user_id=user, item_ids=items)
    with serve_process(args, tmp_path / "serve.log") as served, grpc.insecure_channel(served.address) as ch:
        stub = rank_pb2_grpc.RankingServiceStub(ch)
        before = stub.Rank(request, timeout=DEADLINE_S)
        (triton,) = [p for p in psutil.Process(served.proc.pid).children() if p.name() == "tritonserver"]
        triton.send_signal(signal.SIGKILL)  # a crash: no drain, no goodbye
        triton.wait(10)
        with pytest.raises(grpc.RpcError) as e:
            stub.Rank(request, timeout=DEADLINE_S)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "Triton" in e.value.details()
        assert health_status(served.address) in ("NOT_SERVING", "SERVING")  # the server itself answers
        wait_health(served.address, "NOT_SERVING", 15)
        wait_health(served.address, "SERVING", 120)
        after = stub.Rank(request, timeout=DEADLINE_S)
        (restarted,) = [p for p in psutil.Process(served.proc.pid).children() if p.name() == "tritonserver"]
        assert restarted.pid != triton.pid and served.proc.poll() is None
        assert {i.item_id: i.score for i in after.items} == {i.item_id: i.score for i in before.items}
        assert after.model_version == before.model_version
