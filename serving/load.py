"""Closed-loop load on a Rank server, and ``hisam serve`` as a process to put it on.

``rank_load`` runs ``clients`` concurrent gRPC clients, each with its own channel (its own
HTTP/2 connection, as separate callers would have), for ``seconds``: each client sends its
next request as soon as the previous one is answered. Every answer is checked with
``check_answer`` (the Rank contract below) and, when given, a caller's ``check``; every
outcome is kept: latencies of the answered calls, error counts by gRPC status code, and
the first few malformed answers with what was wrong. ``hisam bench rank`` reports its
percentiles; tests/serving/test_rank_load.py asserts it saw no error and no malformed answer.

The contract an answer is checked against (rank.proto, docs/design.md "Contracts"): every
candidate comes back exactly once; scored items first, by score descending and item id
ascending on ties, every score finite; then the unscored ones (unknown item, tokenizer
mismatch) in request order with score 0; the model version is set when anything was
scored; the request id is echoed.

``serve_process`` starts ``python -m hisam.jobs.serve`` (so client and server do not share a
GIL) on a free port, waits until its health is SERVING, and stops it with SIGTERM (it drains
in-flight calls) on exit.

``RankCaller`` is the other kind of caller: not a load but a steady trickle, one client in a
thread making one call every ``interval_s``, each call kept as a row (``rank_call``), so that
what answered (which model version, how fast, which errors) can be followed over time.

Every helper takes ``security`` (serving/security.py ``ClientSecurity``: TLS, a client
certificate, a bearer token; None: plaintext, no token) and builds its channels with
``rank_channel``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np

from serving.security import ClientSecurity, rank_channel

Request = tuple[int, list[int]]  # (user id, candidate item ids)

SCORED = 1  # rank.proto ITEM_STATUS_SCORED
KNOWN_STATUSES = (1, 2, 3)  # SCORED, UNKNOWN_ITEM, TOKENIZER_MISMATCH


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``xs``; NaN when there is nothing to summarise (a report shows "-")."""
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else math.nan


def check_answer(request: Request, request_id: str, resp) -> str | None:
    """What is wrong with ``resp`` as the answer to ``request`` (module docstring), or None."""
    _, items = request
    got = [it.item_id for it in resp.items]
    if sorted(got) != sorted(items):
        return f"items {got} are not the candidates {items}"
    if resp.request_id != request_id:
        return f"request id {resp.request_id!r}, sent {request_id!r}"
    statuses = [it.status for it in resp.items]
    if any(s not in KNOWN_STATUSES for s in statuses):
        return f"unknown item status in {statuses}"
    n = sum(s == SCORED for s in statuses)
    if statuses[:n] != [SCORED] * n:
        return "an unscored item comes before a scored one"
    scored = [(it.score, it.item_id) for it in resp.items[:n]]
    if any(not math.isfinite(s) for s, _ in scored):
        return f"non-finite score in {scored}"
    if scored != sorted(scored, key=lambda x: (-x[0], x[1])):
        return "scored items are not sorted by score descending, then item id"
    rest = list(resp.items[n:])
    if [it.item_id for it in rest] != [i for i in items if i in {it.item_id for it in rest}]:
        return "unscored items are not in request order"
    if any(it.score != 0.0 for it in rest):
        return "an unscored item has a score"
    if n and not resp.model_version:
        return "scored items but no model version"
    return None


@dataclass
class LoadResult:
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)  # answered calls
    errors: Counter = field(default_factory=Counter)  # gRPC status code name -> calls
    error_details: list[str] = field(default_factory=list)  # the first few
    malformed: list[str] = field(default_factory=list)  # the first few
    n_malformed: int = 0
    answered_per_client: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.latencies_ms) + sum(self.errors.values())

    def percentile_ms(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def summary(self) -> dict:
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 3),
            "requests": self.n,
            "answered": len(self.latencies_ms),
            "errors": dict(self.errors),
            "malformed": self.n_malformed,
            "p50_ms": self.percentile_ms(50),
            "p90_ms": self.percentile_ms(90),
            "p99_ms": self.percentile_ms(99),
            "max_ms": max(self.latencies_ms, default=math.nan),
            "qps": len(self.latencies_ms) / self.seconds if self.seconds else math.nan,
        }


async def rank_load(
    address: str,
    requests: Sequence[Request],
    clients: int,
    seconds: float,
    *,
    timeout_s: float = 30.0,
    check: Callable[[int, object], str | None] | None = None,
    keep: int = 10,
    security: ClientSecurity | None = None,
) -> LoadResult:
    """``clients`` closed-loop clients for ``seconds`` (module docstring).

    Client ``c`` sends requests ``c, c + clients, ...`` of ``requests`` (cycling); ``check(index,
    response)`` may add its own verdict on an answer to ``requests[index]``.
    """
    import grpc

    from hisam_pb.v1 import rank_pb2, rank_pb2_grpc

    out = LoadResult(clients, seconds, answered_per_client=[0] * clients)

    async def client(c: int, stop_at: float) -> None:
        async with rank_channel(address, security, aio=True) as channel:
            stub = rank_pb2_grpc.RankingServiceStub(channel)
            n = c
            while time.perf_counter() < stop_at:
                k = n % len(requests)
                user, items = requests[k]
                rid = f"load-{c}-{n}"
                n += clients
                t0 = time.perf_counter()
                try:
                    resp = await stub.Rank(
                        rank_pb2.RankRequest(user_id=user, item_ids=items, request_id=rid), timeout=timeout_s
                    )
                except grpc.aio.AioRpcError as e:
                    out.errors[e.code().name] += 1
                    if len(out.error_details) < keep:
                        out.error_details.append(f"{rid}: {e.code().name}: {e.details()}")
                    continue
                out.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                out.answered_per_client[c] += 1
                why = check_answer(requests[k], rid, resp) or (check(k, resp) if check else None)
                if why is not None:
                    out.n_malformed += 1
                    if len(out.malformed) < keep:
                        out.malformed.append(f"{rid} ({user}, {items}): {why}")

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c, t0 + seconds) for c in range(clients)))
    out.seconds = time.perf_counter() - t0
    return out


# --- hisam serve as a process ---------------------------------------------------------------------


@dataclass(frozen=True)
class ServeProcess:
    address: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def health_status(
    address: str, timeout_s: float = 1.0, service: str = "", security: ClientSecurity | None = None
) -> str:
    """A health service's status (default: the server's overall health): SERVING, NOT_SERVING, ...,
    or the gRPC error code of the check."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with rank_channel(address, security) as ch:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            got = health_pb2_grpc.HealthStub(ch).Check(request, timeout=timeout_s)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(got.status)


def wait_health(
    address: str,
    want: str,
    timeout_s: float,
    proc: subprocess.Popen | None = None,
    security: ClientSecurity | None = None,
) -> float:
    """Seconds until the server's health is ``want``; raises TimeoutError (or RuntimeError if it exited)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"hisam serve exited with code {proc.returncode}")
        if health_status(address, security=security) == want:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise TimeoutError(f"Rank server at {address} not {want} after {timeout_s:.0f}s")


@contextlib.contextmanager
def serve_process(
    args: Sequence[str], log_path: Path, timeout_s: float = 180.0, security: ClientSecurity | None = None
) -> Iterator[ServeProcess]:
    """``python -m hisam.jobs.serve --port <free> ARGS`` until the ``with`` body ends (module docstring);
    ``security``: how to reach it when ARGS protect its port (its health is checked through it)."""
    from infra.ports import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "hisam.jobs.serve", "--port", str(port), *args]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"}
        )
    served = ServeProcess(f"127.0.0.1:{port}", proc, Path(log_path))
    try:
        try:
            wait_health(served.address, "SERVING", timeout_s, proc, security)
        except (TimeoutError, RuntimeError) as e:
            raise RuntimeError(f"{e}; log: {served.log_tail()}") from e
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- one caller in a thread -----------------------------------------------------------------------


def rank_call(stub, request: Request, timeout_s: float, request_id: str = "") -> dict:
    """One Rank call as a row: when, for whom, how long, and what answered (or the error)."""
    import grpc

    from hisam_pb.v1 import rank_pb2

    user, items = request
    t0 = time.perf_counter()
    row: dict = {"t": time.time(), "user": user}
    try:
        resp = stub.Rank(rank_pb2.RankRequest(user_id=user, item_ids=items, request_id=request_id), timeout=timeout_s)
    except grpc.RpcError as e:
        return row | {"ok": False, "ms": (time.perf_counter() - t0) * 1000, "error": f"{e.code().name}: {e.details()}"}
    return row | {
        "ok": True,
        "ms": (time.perf_counter() - t0) * 1000,
        "model_version": resp.model_version,
        "history_len": resp.history_len,
        "cache_hit": resp.cache_hit,
        "top": [(it.item_id, round(it.score, 4)) for it in resp.items[:5]],
        "scored": sum(it.status == SCORED for it in resp.items),
    }


def rank_calls(
    address: str, requests: Sequence[Request], timeout_s: float = 10.0, security: ClientSecurity | None = None
) -> list[dict]:
    """``rank_call`` for each request in turn, on one channel."""
    from hisam_pb.v1 import rank_pb2_grpc

    with rank_channel(address, security) as channel:
        stub = rank_pb2_grpc.RankingServiceStub(channel)
        return [rank_call(stub, r, timeout_s) for r in requests]


class RankCaller:
    """Calls Rank every ``interval_s`` in a thread, until ``close``, and keeps every call (``rank_call``).

    ``next_request`` says what to ask each time (None: nothing yet, skip this turn); it
    runs in the caller's thread.
    """

    def __init__(
        self,
        address: str,
        next_request: Callable[[], Request | None],
        interval_s: float,
        timeout_s: float = 10.0,
        request_id: str = "",
        security: ClientSecurity | None = None,
    ) -> None:
        import threading

        from hisam_pb.v1 import rank_pb2_grpc

        self.address, self.next_request = address, next_request
        self.interval_s, self.timeout_s, self.request_id = interval_s, timeout_s, request_id
        self.channel = rank_channel(address, security)
        self.stub = rank_pb2_grpc.RankingServiceStub(self.channel)
        self.calls: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rank-caller", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    @property
    def versions(self) -> list[str]:
        """The model version of every answer, in order."""
        return [c["model_version"] for c in self.calls if c["ok"]]

    @property
    def failures(self) -> list[str]:
        """Every failed call's gRPC status and details, in order."""
        return [c["error"] for c in self.calls if not c["ok"]]

    def _run(self) -> None:
        while not self._stop.is_set():
            request = self.next_request()
            if request is not None:
                self.calls.append(rank_call(self.stub, request, self.timeout_s, self.request_id))
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        """Stop calling and close the channel; a second close does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout_s + 5)
        self.channel.close()


class RankProbe(RankCaller):
    """One caller asking Rank the same question every ``interval_s``: what reliability tests watch.

    They check the model version of every answer and every failure across a version swap,
    a trainer crash or a dependency outage.
    """

    def __init__(
        self,
        address: str,
        user: int,
        items: Sequence[int],
        interval_s: float = 0.1,
        security: ClientSecurity | None = None,
    ) -> None:
        request = (user, list(items))
        super().__init__(address, lambda: request, interval_s, timeout_s=30.0, request_id="probe", security=security)
