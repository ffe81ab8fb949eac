"""The gRPC ``RankingService`` (proto/hisam/pb/v1/rank.proto): async server, health, reflection.

The servicer only translates between protobuf and ``serving.ranking`` and maps its errors
to status codes (INVALID_ARGUMENT, UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL); the call's
deadline (``context.time_remaining()``) bounds the work, including the Triton call.

Health (``grpc.health.v1``): the overall service ("") and ``hisam.pb.v1.RankingService``
are SERVING while the inference backend and the online store answer, NOT_SERVING while
either does not; a background probe re-checks every ``health_interval_s`` seconds, so a
load balancer stops sending traffic while a dependency is down and resumes when it is back.
Reflection lists the ranking and health services (``grpcurl`` works without the .proto).

Shutdown: health turns NOT_SERVING first, then the server stops accepting calls and gives
in-flight ones ``grace_s`` seconds to finish (``grpc.aio.Server.stop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from hisam.pb.v1 import rank_pb2, rank_pb2_grpc
from serving.ranking import DeadlineExceeded, InvalidRequest, ModelError, Ranker, RankResult, Unavailable

log = logging.getLogger(__name__)

SERVICE_NAME = rank_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name


class RankingService(rank_pb2_grpc.RankingServiceServicer):
    """rank.proto's RankingService over a ``Ranker``."""

    def __init__(self, ranker: Ranker) -> None:
        self.ranker = ranker

    async def Rank(self, request: rank_pb2.RankRequest, context: grpc.aio.ServicerContext) -> rank_pb2.RankResponse:
        remaining = context.time_remaining()
        timeout_s = None if remaining is None or math.isinf(remaining) else max(remaining, 0.0)
        try:
            result = await self.ranker.rank(request.user_id, list(request.item_ids), timeout_s)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Unavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except DeadlineExceeded as e:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except ModelError as e:
            log.error("request %r: %s", request.request_id, e)
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        return to_proto(result, request.request_id)


def to_proto(result: RankResult, request_id: str) -> rank_pb2.RankResponse:
    return rank_pb2.RankResponse(
        items=[rank_pb2.ScoredItem(item_id=i.item_id, score=i.score, status=int(i.status)) for i in result.items],
        model_version=result.model_version,
        request_id=request_id,
        history_len=result.history_len,
        cache_hit=result.cache_hit,
    )


async def _healthy(ranker: Ranker) -> tuple[bool, str]:
    if not await ranker.backend.ready():
        return False, f"inference backend ({ranker.backend.name}) not ready"
    try:
        await ranker.reader.ping()
    except Exception as e:  # noqa: BLE001 - any failure means not serving
        return False, str(e)
    return True, ""


async def _probe(ranker: Ranker, health: HealthServicer, interval_s: float) -> None:
    last = None
    while True:
        ok, why = await _healthy(ranker)
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health.set(name, status)
        if ok != last:
            (log.info if ok else log.warning)(
                "health: %s%s", "SERVING" if ok else "NOT_SERVING", f" ({why})" if why else ""
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
