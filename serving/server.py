"""The gRPC ``RankingService`` (proto/hisam_pb/v1/rank.proto): async server, health, reflection.

The servicer only translates between protobuf and ``serving.ranking`` and maps its errors
to status codes (INVALID_ARGUMENT, UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL); the call's
deadline (``context.time_remaining()``) bounds the work, including the Triton call (a call
without a deadline gets the ranker's ``default_timeout_s``).

Health (``grpc.health.v1``): the overall service ("") and ``hisam.pb.v1.RankingService``
are SERVING while the inference backend and the online store answer, NOT_SERVING while
either does not; a background probe re-checks every ``health_interval_s`` seconds, so a
load balancer stops sending traffic while a dependency is down and resumes when it is back.
Reflection lists the ranking and health services (``grpcurl`` works without the .proto).

When Triton stops (crash, restart, rollout), Rank fails fast and recovers by itself:

- Rank answers UNAVAILABLE with ``Triton at HOST:PORT unavailable for MODEL: <cause>``, as
  soon as the connection is refused (milliseconds, not the deadline); calls in flight when
  Triton dies get the same. A Triton that hangs instead of dying is cut off by the deadline
  (DEADLINE_EXCEEDED). There is no degraded answer: no scores from another model, no
  zeros. UNAVAILABLE is gRPC's retryable code; the caller retries with backoff or falls back
  to its own order of the candidates. Request validation still runs first (a bad request is
  INVALID_ARGUMENT whatever the state of Triton).
- Health turns NOT_SERVING within one probe interval (``hisam_serving_dependency_up
  {dependency="backend"}`` goes to 0), so load balancers and Kubernetes readiness move
  traffic to replicas that can answer.
- Recovery needs no restart of this server: the Triton channel reconnects with a backoff
  capped at one second (serving/backends.py), Rank answers again as soon as Triton serves
  the models, and health is SERVING again at the next probe. The anchor caches stay valid
  (they are keyed by the model version, which Triton reports with every answer).
- The online store down is the same story with ``online store (...) unavailable``.

Metrics (infra/observability.py): Rank calls and latency by status code, calls in flight,
candidates per request, answered items by status, the model version that answered, and
each dependency's health.

Shutdown: health turns NOT_SERVING first, then the server stops accepting calls and gives
in-flight ones ``grace_s`` seconds to finish (``grpc.aio.Server.stop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from hisam_pb.v1 import rank_pb2, rank_pb2_grpc
from infra import observability as obs
from serving.ranking import DeadlineExceeded, InvalidRequest, ModelError, Ranker, RankResult, Unavailable

log = logging.getLogger(__name__)

SERVICE_NAME = rank_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name

# serving.ranking's errors -> gRPC status codes (module docstring).
ERROR_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ModelError, grpc.StatusCode.INTERNAL),
)
_MAPPED = tuple(e for e, _ in ERROR_CODES)


class RankingService(rank_pb2_grpc.RankingServiceServicer):
    """rank.proto's RankingService over a ``Ranker``."""

    def __init__(self, ranker: Ranker) -> None:
        self.ranker = ranker

    async def Rank(self, request: rank_pb2.RankRequest, context: grpc.aio.ServicerContext) -> rank_pb2.RankResponse:
        remaining = context.time_remaining()
        timeout_s = None if remaining is None or math.isinf(remaining) else max(remaining, 0.0)
        t0 = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN  # an exception nobody mapped: gRPC answers UNKNOWN
        obs.RANK_IN_FLIGHT.inc()
        obs.RANK_CANDIDATES.observe(len(request.item_ids))
        try:
            try:
                result = await self.ranker.rank(request.user_id, list(request.item_ids), timeout_s)
            except _MAPPED as e:
                code = next(c for t, c in ERROR_CODES if isinstance(e, t))
                if code == grpc.StatusCode.INTERNAL:
                    log.error("Rank failed: %s", e, extra={"request_id": request.request_id, "code": code.name})
                await context.abort(code, str(e))
            code = grpc.StatusCode.OK
            observe_result(result)
            return to_proto(result, request.request_id)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the client went away or the server is stopping
            raise
        finally:
            obs.RANK_IN_FLIGHT.dec()
            obs.RANK_REQUESTS.labels(code.name).inc()
            obs.RANK_LATENCY.labels(code.name).observe(time.perf_counter() - t0)


def observe_result(result: RankResult) -> None:
    """Item statuses and the answering model version of a successful Rank."""
    for status, n in Counter(item.status.name.lower() for item in result.items).items():
        obs.RANK_ITEMS.labels(status).inc(n)
    obs.set_serving_model_version(result.model_version)


def to_proto(result: RankResult, request_id: str) -> rank_pb2.RankResponse:
    return rank_pb2.RankResponse(
        items=[rank_pb2.ScoredItem(item_id=i.item_id, score=i.score, status=int(i.status)) for i in result.items],
        model_version=result.model_version,
        request_id=request_id,
        history_len=result.history_len,
        cache_hit=result.cache_hit,
    )


async def _healthy(ranker: Ranker) -> tuple[bool, str]:
    """(serving, why not): both dependencies are probed every time, for their gauges."""
    why = []
    backend_ok = await ranker.backend.ready()
    if not backend_ok:
        why.append(f"inference backend ({ranker.backend.name}) not ready")
    try:
        await ranker.reader.ping()
        store_ok = True
    except Exception as e:  # noqa: BLE001 - any failure means not serving
        why.append(str(e))
        store_ok = False
    obs.DEPENDENCY_UP.labels("backend").set(int(backend_ok))
    obs.DEPENDENCY_UP.labels("store").set(int(store_ok))
    return backend_ok and store_ok, "; ".join(why)


async def _probe(ranker: Ranker, health: HealthServicer, interval_s: float) -> None:
    last = None
    while True:
        ok, why = await _healthy(ranker)
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health.set(name, status)
        if ok != last:
            state = "SERVING" if ok else "NOT_SERVING"
            (log.info if ok else log.warning)(
                "health: %s%s", state, f" ({why})" if why else "", extra={"health": state, "reason": why}
            )
            last = ok
        await asyncio.sleep(interval_s)


@dataclass(frozen=True)
class ServerHandle:
    address: str  # host:port the server listens on
    port: int


@contextlib.asynccontextmanager
async def rank_server(
    ranker: Ranker, host: str = "127.0.0.1", port: int = 0, *, grace_s: float = 5.0, health_interval_s: float = 1.0
) -> AsyncIterator[ServerHandle]:
    """Serve ``ranker`` on host:port (0: a free port) for the ``async with`` body."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    rank_pb2_grpc.add_RankingServiceServicer_to_server(RankingService(ranker), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    probe = asyncio.create_task(_probe(ranker, health, health_interval_s))
    log.info("RankingService listening on %s:%d (backend %s)", host, bound, ranker.backend.name)
    try:
        yield ServerHandle(f"{host}:{bound}", bound)
    finally:
        probe.cancel()
        await health.enter_graceful_shutdown()
        await server.stop(grace_s)
        with contextlib.suppress(asyncio.CancelledError):
            await probe
        log.info("RankingService on %s:%d stopped", host, bound)


@contextlib.contextmanager
def rank_server_thread(make_ranker, host: str = "127.0.0.1", port: int = 0, **kwargs) -> Iterator[ServerHandle]:
    """Run the server on its own event loop in a background thread (tests, notebooks).

    ``make_ranker()`` is called on that loop (async clients must be created there).
    """
    loop = asyncio.new_event_loop()
    started: dict = {}
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        ranker = make_ranker()
        try:
            async with rank_server(ranker, host, port, **kwargs) as handle:
                started["handle"] = handle
                ready.set()
                await stop.wait()
        except BaseException as e:
            started["error"] = e
            ready.set()
            raise
        finally:
            await ranker.backend.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="rank-server", daemon=True)
    thread.start()
    ready.wait(60)
    if "error" in started or "handle" not in started:
        thread.join(5)
        raise RuntimeError(f"rank server did not start: {started.get('error')!r}")
    try:
        yield started["handle"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()
