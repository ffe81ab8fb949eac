"""Where the HMAT graphs run for Rank: Triton over gRPC, or ONNX Runtime in-process.

Both backends offer the same three async calls, one per serving graph of
``export.graphs`` (feeds and outputs as export/graphs.py documents them), and return the
content version of the model that computed the result:

- ``rank(feed) -> (scores (B, N), version)``: full one-pass ranking;
- ``encode_history(feed) -> (outputs, version)``: the anchor KV cache of a history;
- ``score_with_cache(feed) -> (scores (B, N), version)``: candidates against a cache.

``TritonBackend`` is the served path (``tritonclient.grpc.aio``; the models of
serving/repository.py). ``OrtBackend`` runs the same ONNX files in this process (the
embedded option, and the compute baseline of ``hisam bench rank``); its sessions run in
worker threads so the event loop is never blocked.

Errors: ``BackendUnavailable`` when Triton cannot be reached, is shutting down or has no
ready model, ``BackendDeadline`` when the per-call timeout passes, ``BackendError``
otherwise.

Every outbound call has a timeout: an inference call the time left of its Rank call (the
ranker passes it; ``CALL_TIMEOUT_S`` when a caller passes none), the readiness probe
``ready(timeout_s)`` (1 s by default, its three ``is_model_ready`` calls concurrently, each
with that ``client_timeout``), so a Triton that accepts connections but never answers turns
the probe false within its bound instead of holding it. The Triton client's channel reconnects by itself, with its reconnect backoff
capped at ``RECONNECT_MAX_MS`` (gRPC's default grows to two minutes, which would keep Rank
failing long after a restarted Triton is back); calls succeed again as soon as Triton
serves its models, with no restart of the Rank server.

Metrics (infra/observability.py): every call's latency when it succeeds, and its failures by
kind, per backend and graph.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from infra import observability as obs
from infra.triton_access import OPEN, TritonAccess
from serving.repository import GRAPH_MODELS, MODEL_FILE, VERSION_OUTPUT, published_versions

log = logging.getLogger(__name__)

ENCODE_OUTPUTS = (
    "keys",
    "values",
    "slot_token_type",
    "slot_item",
    "slot_block",
    "slot_order",
    "n_slots",
    "n_items",
    "next_order",
)


# Reconnect backoff of the Triton channel (module docstring), and the keepalive tritonclient
# sets by default (its defaults are replaced as a whole when channel_args are given).
RECONNECT_INITIAL_MS = 100
RECONNECT_MAX_MS = 1000
# The timeout of a call whose caller gave none (module docstring), and of a readiness probe.
CALL_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 1.0
# Statuses and messages of a Triton that cannot answer now but will (down, starting, stopping,
# loading a model); anything else is a failure of the request itself.
UNAVAILABLE_STATUSES = ("UNAVAILABLE", "CANCELLED", "ABORTED")
UNAVAILABLE_MESSAGES = (
    "unknown model",  # unloaded while stopping, or not loaded yet while starting
    "no available versions",
    "not found",
    "not ready",
    "unavailable",
    "stopping",
    "shutting down",
)


class BackendError(RuntimeError):
    """The inference backend failed a request."""


class BackendUnavailable(BackendError):
    """The inference backend cannot be reached, or its model is not ready."""


class BackendDeadline(BackendError):
    """The call did not finish in the time it was given."""


def _kind(error: BackendError) -> str:
    """The ``kind`` label of hisam_serving_backend_errors_total."""
    if isinstance(error, BackendUnavailable):
        return "unavailable"
    return "deadline" if isinstance(error, BackendDeadline) else "error"


class TritonBackend:
    """The three HMAT models on a Triton server (``url``: host:grpc_port)."""

    name = "triton"

    def __init__(self, url: str, access: TritonAccess = OPEN) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.url = url
        self._grpc = grpcclient
        self._access = access
        keepalive = grpcclient.KeepAliveOptions()
        self._client = grpcclient.InferenceServerClient(
            url,
            channel_args=[
                ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
                ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
                ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
                ("grpc.min_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
                ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
            ],
            **access.client_kwargs(),
        )

    def _inputs(self, feed: Mapping[str, np.ndarray]) -> list:
        from tritonclient.utils import np_to_triton_dtype

        out = []
        for name, value in feed.items():
            arr = np.ascontiguousarray(value)
            inp = self._grpc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            inp.set_data_from_numpy(arr)
            out.append(inp)
        return out

    async def _infer(
        self, graph: str, feed: Mapping[str, np.ndarray], outputs: tuple[str, ...], timeout_s: float | None
    ) -> tuple[dict[str, np.ndarray], str]:
        from tritonclient.utils import InferenceServerException

        model = GRAPH_MODELS[graph]
        requested = [self._grpc.InferRequestedOutput(n) for n in (*outputs, VERSION_OUTPUT)]
        timeout_s = CALL_TIMEOUT_S if timeout_s is None else timeout_s
        t0 = time.perf_counter()
        try:
            headers = self._access.headers()  # read now: a rotated key needs no restart
            result = await self._client.infer(
                model, self._inputs(feed), outputs=requested, headers=headers, client_timeout=timeout_s
            )
        except (InferenceServerException, ValueError) as e:
            error = BackendError(str(e)) if isinstance(e, ValueError) else self._classify(model, e)
            obs.BACKEND_ERRORS.labels(self.name, graph, _kind(error)).inc()
            raise error from e
        obs.BACKEND_LATENCY.labels(self.name, graph).observe(time.perf_counter() - t0)
        version = result.as_numpy(VERSION_OUTPUT)
        # as_numpy views the response buffer (read-only); a copy is what the cache keeps.
        return {n: np.array(result.as_numpy(n)) for n in outputs}, bytes(version.reshape(-1)[0]).decode()

    def _classify(self, model: str, e) -> BackendError:
        status, message = str(e.status() or ""), str(e.message())
        if "DEADLINE_EXCEEDED" in status:
            return BackendDeadline(f"Triton call to {model} passed its deadline")
        if "protocol is restricted" in message:  # a missing or wrong key (infra/triton_access.py), not an outage
            return BackendError(f"Triton refused {model}: {message}; check --triton-key-file")
        if any(s in status for s in UNAVAILABLE_STATUSES) or any(m in message.lower() for m in UNAVAILABLE_MESSAGES):
            return BackendUnavailable(f"Triton at {self.url} unavailable for {model}: {message}")
        return BackendError(f"Triton failed {model}: {message}")

    async def rank(self, feed: Mapping[str, np.ndarray], timeout_s: float | None = None) -> tuple[np.ndarray, str]:
        out, version = await self._infer("ranking", feed, ("scores",), timeout_s)
        return out["scores"], version

    async def encode_history(
        self, feed: Mapping[str, np.ndarray], timeout_s: float | None = None
    ) -> tuple[dict[str, np.ndarray], str]:
        return await self._infer("encode_history", feed, ENCODE_OUTPUTS, timeout_s)

    async def score_with_cache(
        self, feed: Mapping[str, np.ndarray], timeout_s: float | None = None
    ) -> tuple[np.ndarray, str]:
        out, version = await self._infer("score_with_cache", feed, ("scores",), timeout_s)
        return out["scores"], version

    async def ready(self, timeout_s: float = READY_TIMEOUT_S) -> bool:
        """Whether Triton serves the three models; False when it does not answer within ``timeout_s``."""
        try:
            headers = self._access.headers()
        except ValueError as e:
            log.warning("Triton readiness not asked: %s", e)
            return False
        calls = [
            self._client.is_model_ready(m, headers=headers, client_timeout=timeout_s) for m in GRAPH_MODELS.values()
        ]
        try:
            # The outer bound also covers what client_timeout does not (connecting, the channel's own waits).
            return all(await asyncio.wait_for(asyncio.gather(*calls), timeout_s + 0.5))
        except Exception:  # noqa: BLE001 - any failure to answer means not ready
            return False

    async def close(self) -> None:
        await self._client.close()


class OrtBackend:
    """The same graphs in-process with ONNX Runtime (CPU provider).

    ``source``: a model repository (its newest complete version is loaded) or a directory
    of ``export_all`` files. ``threads``: intra-op threads per session; ``workers``: how many
    requests may run at once (ONNX Runtime sessions are safe to call concurrently).
    """

    name = "ort"

    def __init__(self, source: str | Path, threads: int = 1, workers: int = 1) -> None:
        import onnx
        import onnxruntime as ort

        src = Path(source)
        versions = published_versions(src)
        if versions:
            n = max(versions)
            paths = {g: src / m / str(n) / MODEL_FILE for g, m in GRAPH_MODELS.items()}
        else:
            paths = {g: src / f"{g}.onnx" for g in GRAPH_MODELS}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"no HMAT graphs to load: missing {missing}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.sessions = {
            g: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for g, p in paths.items()
        }
        meta = {p.key: p.value for p in onnx.load(str(paths["ranking"]), load_external_data=False).metadata_props}
        self.version = meta.get("model_version", "")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ort")

    def run_sync(self, graph: str, feed: Mapping[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self.sessions[graph].run(list(outputs), dict(feed)), strict=True))

    async def _run(self, graph: str, feed: Mapping[str, np.ndarray], outputs: tuple[str, ...], timeout_s: float | None):
        loop = asyncio.get_running_loop()
        timeout_s = CALL_TIMEOUT_S if timeout_s is None else timeout_s
        t0 = time.perf_counter()
        try:
            out = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self.run_sync, graph, feed, outputs), timeout_s
            )
        except TimeoutError as e:
            obs.BACKEND_ERRORS.labels(self.name, graph, "deadline").inc()
            raise BackendDeadline(f"in-process {graph} passed its deadline") from e
        except Exception as e:
            obs.BACKEND_ERRORS.labels(self.name, graph, "error").inc()
            raise BackendError(f"in-process {graph} failed: {e}") from e
        obs.BACKEND_LATENCY.labels(self.name, graph).observe(time.perf_counter() - t0)
        return out

    async def rank(self, feed: Mapping[str, np.ndarray], timeout_s: float | None = None) -> tuple[np.ndarray, str]:
        return (await self._run("ranking", feed, ("scores",), timeout_s))["scores"], self.version

    async def encode_history(
        self, feed: Mapping[str, np.ndarray], timeout_s: float | None = None
    ) -> tuple[dict[str, np.ndarray], str]:
        return await self._run("encode_history", feed, ENCODE_OUTPUTS, timeout_s), self.version

    async def score_with_cache(
        self, feed: Mapping[str, np.ndarray], timeout_s: float | None = None
    ) -> tuple[np.ndarray, str]:
        return (await self._run("score_with_cache", feed, ("scores",), timeout_s))["scores"], self.version

    async def ready(self, timeout_s: float = READY_TIMEOUT_S) -> bool:
        return True

    async def close(self) -> None:
        self._pool.shutdown(wait=False)
