"""The gRPC ``RankingService`` (proto/hisam_pb/v1/rank.proto): async server, health, reflection.

The servicer only translates between protobuf and ``serving.ranking`` and maps its errors
to status codes (INVALID_ARGUMENT, UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL); the call's
deadline (``context.time_remaining()``) bounds the work, including the Triton call, and is
capped at the ranker's ``default_timeout_s`` (a call without a deadline, or with a longer
one, gets the cap; the server stops the work then and answers DEADLINE_EXCEEDED).

Limits (docs/design.md "Rank"; a hostile or broken client cannot exhaust the server):

- ``max_receive_bytes`` (1 MiB by default): a larger request is refused by gRPC itself with
  RESOURCE_EXHAUSTED before it is parsed. The largest legitimate request is
  ``largest_request_bytes(max_candidates)``: 9,145 bytes at the default 1,000 candidates
  (each id a packed varint of at most 9 bytes, a 10-byte user id, a 128-byte request id), so
  1 MiB leaves room for a raised ``--max-candidates`` (about 100,000) and is a quarter of
  gRPC's 4 MiB default; the server refuses to start with a limit below the largest
  legitimate request.
- ``max_concurrent_rpcs`` (256 by default; gRPC's ``maximum_concurrent_rpcs``): calls beyond
  it are refused at once with RESOURCE_EXHAUSTED instead of queueing. At a replica's few
  thousand calls a second and tens of milliseconds each, Little's law puts about a hundred
  in flight; 256 bounds the memory of the calls held (each well under 1 MB of feeds and
  answer) and, with the deadline cap, how long a hung dependency can hold them. The limit
  counts every RPC of the server, health checks included: a saturated server may answer a
  health check with RESOURCE_EXHAUSTED, which probes read as not ready.
- ``request_id`` at most ``MAX_REQUEST_ID_BYTES`` (128) bytes in UTF-8, else
  INVALID_ARGUMENT: it is echoed and logged.

Health (``grpc.health.v1``): the overall service ("") and ``hisam.pb.v1.RankingService``
are SERVING while the inference backend and the online store answer, NOT_SERVING while
either does not; a background probe re-checks every ``health_interval_s`` seconds, so a
load balancer stops sending traffic while a dependency is down and resumes when it is back.
Both probes run concurrently, each bounded by ``health_timeout_s`` (1 s by default): a
dependency that hangs (accepts connections, never answers) turns health NOT_SERVING within
``health_interval_s + health_timeout_s`` (2 s by default; ``health_deadline_s``).
A third name, ``liveness``, is SERVING from start to shutdown whatever the dependencies
do: the chart's liveness probe asks for it, so a dependency outage makes the pod unready
(no traffic) but never gets it restarted, which would not help.

Reflection (``reflection=True``, ``hisam serve --reflection``; off by default) lists the
ranking and health services (``grpcurl`` works without the .proto).

Security (serving/security.py, docs/operations.md "Security: the Rank port"): with TLS the
server listens with TLS only, optionally requiring client certificates (mutual TLS); with a
token file every call but health checks needs a bearer token, a call without a valid one
is UNAUTHENTICATED and counted in the Rank request metric.

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
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection as grpc_reflection

from features.store.base import OnlineStoreError
from hisam_pb.v1 import rank_pb2, rank_pb2_grpc
from infra import observability as obs
from serving.ranking import DeadlineExceeded, InvalidRequest, ModelError, Ranker, RankResult, Unavailable
from serving.security import ServerSecurity

log = logging.getLogger(__name__)

SERVICE_NAME = rank_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name
RANK_METHOD = f"/{SERVICE_NAME}/Rank"
# The health service name a liveness probe asks for (module docstring).
LIVENESS_SERVICE = "liveness"

# serving.ranking's errors -> gRPC status codes (module docstring).
ERROR_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ModelError, grpc.StatusCode.INTERNAL),
    # The store holds this user's state in a layout it cannot read (a corrupt user): the
    # message names the user; other users are served as usual.
    (OnlineStoreError, grpc.StatusCode.INTERNAL),
)
_MAPPED = tuple(e for e, _ in ERROR_CODES)


# Limits (module docstring).
MAX_RECEIVE_BYTES = 1 << 20
MAX_CONCURRENT_RPCS = 256
MAX_REQUEST_ID_BYTES = 128
HEALTH_TIMEOUT_S = 1.0


def largest_request_bytes(max_candidates: int) -> int:
    """The serialized size of the largest RankRequest the server accepts with ``max_candidates``."""
    return rank_pb2.RankRequest(
        user_id=-1, item_ids=[2**63 - 1] * max_candidates, request_id="x" * MAX_REQUEST_ID_BYTES
    ).ByteSize()


def health_deadline_s(health_interval_s: float, health_timeout_s: float) -> float:
    """The longest a hung dependency leaves health SERVING: one pause between probes plus one probe."""
    return health_interval_s + health_timeout_s


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
                check_request_id(request.request_id)
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

    async def RankBytes(self, raw: bytes, context: grpc.aio.ServicerContext) -> rank_pb2.RankResponse:
        """``Rank`` as registered (``add_to_server``): the request arrives as bytes and is parsed
        here, so bytes that are no RankRequest (garbage, a request_id that is not UTF-8) are
        INVALID_ARGUMENT and counted, not the UNKNOWN that gRPC's own deserializer answers."""
        try:
            request = rank_pb2.RankRequest.FromString(raw)
        except DecodeError as e:
            obs.RANK_REQUESTS.labels(grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a RankRequest: {e}")
        return await self.Rank(request, context)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the service, its Rank method taking raw bytes (``RankBytes``)."""
        rank = grpc.unary_unary_rpc_method_handler(
            self.RankBytes, request_deserializer=None, response_serializer=rank_pb2.RankResponse.SerializeToString
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Rank": rank}),))


def check_request_id(request_id: str) -> None:
    n = len(request_id.encode("utf-8"))
    if n > MAX_REQUEST_ID_BYTES:
        raise InvalidRequest(f"request_id is {n} bytes, more than the limit of {MAX_REQUEST_ID_BYTES}")


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


async def _healthy(ranker: Ranker, timeout_s: float) -> tuple[bool, str]:
    """(serving, why not): both dependencies are probed every time, concurrently, for their gauges;
    each probe is bounded by ``timeout_s``."""

    async def backend() -> bool:
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(ranker.backend.ready(timeout_s), timeout_s)
        return False

    backend_ok, store_error = await asyncio.gather(backend(), ranker.reader.ping(timeout_s), return_exceptions=True)
    why = []
    if isinstance(backend_ok, BaseException) or not backend_ok:
        why.append(f"inference backend ({ranker.backend.name}) not ready (or no answer within {timeout_s:g}s)")
        backend_ok = False
    store_ok = store_error is None
    if not store_ok:
        why.append(str(store_error))
    obs.DEPENDENCY_UP.labels("backend").set(int(backend_ok))
    obs.DEPENDENCY_UP.labels("store").set(int(store_ok))
    return backend_ok and store_ok, "; ".join(why)


async def _probe(ranker: Ranker, health: HealthServicer, interval_s: float, timeout_s: float) -> None:
    last = None
    while True:
        ok, why = await _healthy(ranker, timeout_s)
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


def _count_refused(method: str) -> None:
    """A Rank call refused for want of a valid token counts as UNAUTHENTICATED in the request metric."""
    if method == RANK_METHOD:
        obs.RANK_REQUESTS.labels(grpc.StatusCode.UNAUTHENTICATED.name).inc()


@dataclass(frozen=True)
class ServerHandle:
    address: str  # host:port the server listens on
    port: int


@contextlib.asynccontextmanager
async def rank_server(
    ranker: Ranker,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    grace_s: float = 5.0,
    health_interval_s: float = 1.0,
    health_timeout_s: float = HEALTH_TIMEOUT_S,
    max_receive_bytes: int = MAX_RECEIVE_BYTES,
    max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
    security: ServerSecurity | None = None,
    reflection: bool = False,
) -> AsyncIterator[ServerHandle]:
    """Serve ``ranker`` on host:port (0: a free port) for the ``async with`` body (limits, security,
    reflection: module docstring)."""
    largest = largest_request_bytes(ranker.max_candidates)
    if max_receive_bytes < largest:
        raise ValueError(
            f"max_receive_bytes {max_receive_bytes} is below the largest legitimate request ({largest} bytes "
            f"at {ranker.max_candidates} candidates)"
        )
    if max_concurrent_rpcs < 1 or health_timeout_s <= 0:
        raise ValueError(
            f"need max_concurrent_rpcs >= 1 and health_timeout_s > 0, got {max_concurrent_rpcs}, {health_timeout_s}"
        )
    security = security or ServerSecurity()
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", max_receive_bytes)],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        interceptors=security.interceptors(on_refused=_count_refused),
    )
    RankingService(ranker).add_to_server(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if reflection:
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, grpc_reflection.SERVICE_NAME)
        grpc_reflection.enable_server_reflection(names, server)
    credentials = security.credentials()
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    # Liveness: SERVING while this process answers (it never follows the dependencies, so a
    # Redis or Triton outage does not get the pod restarted; Kubernetes' gRPC probe names it).
    await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    probe = asyncio.create_task(_probe(ranker, health, health_interval_s, health_timeout_s))
    log.info(
        "RankingService listening on %s:%d (backend %s; %s; limits: %d bytes a request, %d calls at once, %gs a call)",
        host, bound, ranker.backend.name, security.describe(), max_receive_bytes, max_concurrent_rpcs,
        ranker.default_timeout_s,
    )  # fmt: skip
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
            if "handle" in started:
                raise
            started["error"] = e  # a failure to start: the caller raises it
            ready.set()
        finally:
            await ranker.backend.close()
            ranker.reader.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="rank-server", daemon=True)
    thread.start()
    ready.wait(60)
    if "error" in started or "handle" not in started:
        thread.join(5)
        raise RuntimeError(f"rank server did not start: {started.get('error')!r}") from started.get("error")
    try:
        yield started["handle"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()
