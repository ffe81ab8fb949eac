"""Where the HMAT graphs run for Rank: Triton over gRPC, or ONNX Runtime in-process.

Both backends offer the same three async calls, one per serving graph of
``models.hmat.export`` (feeds and outputs as export.py documents them), and return the
content version of the model that computed the result:

- ``rank(feed) -> (scores (B, N), version)``: full one-pass ranking;
- ``encode_history(feed) -> (outputs, version)``: the anchor KV cache of a history;
- ``score_with_cache(feed) -> (scores (B, N), version)``: candidates against a cache.

``TritonBackend`` is the served path (``tritonclient.grpc.aio``; the models of
serving/repository.py). ``OrtBackend`` runs the same ONNX files in this process (the
embedded option, and the compute baseline of ``hisam bench rank``); its sessions run in
worker threads so the event loop is never blocked.

Errors: ``BackendUnavailable`` when Triton cannot be reached or has no ready model (the
channel reconnects by itself, so calls succeed again once Triton is back),
``BackendDeadline`` when the per-call timeout passes, ``BackendError`` otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

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


class BackendError(RuntimeError):
    """The inference backend failed a request."""


class BackendUnavailable(BackendError):
    """The inference backend cannot be reached, or its model is not ready."""


class BackendDeadline(BackendError):
    """The call did not finish in the time it was given."""


class TritonBackend:
    """The three HMAT models on a Triton server (``url``: host:grpc_port)."""

    name = "triton"

    def __init__(self, url: str) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.url = url
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url)

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
        try:
            result = await self._client.infer(model, self._inputs(feed), outputs=requested, client_timeout=timeout_s)
        except InferenceServerException as e:
            status = str(e.status() or "")
            if "UNAVAILABLE" in status or "not found" in str(e.message()) or "not ready" in str(e.message()):
                raise BackendUnavailable(f"Triton at {self.url} unavailable for {model}: {e.message()}") from e
            if "DEADLINE_EXCEEDED" in status:
                raise BackendDeadline(f"Triton call to {model} passed its deadline") from e
            raise BackendError(f"Triton failed {model}: {e.message()}") from e
        version = result.as_numpy(VERSION_OUTPUT)
        # as_numpy views the response buffer (read-only); a copy is what the cache keeps.
        return {n: np.array(result.as_numpy(n)) for n in outputs}, bytes(version.reshape(-1)[0]).decode()

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

    async def ready(self) -> bool:
        try:
            for model in GRAPH_MODELS.values():
                if not await self._client.is_model_ready(model, client_timeout=2.0):
                    return False
            return True
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
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._pool, self.run_sync, graph, feed, outputs), timeout_s
            )
        except TimeoutError as e:
            raise BackendDeadline(f"in-process {graph} passed its deadline") from e
        except Exception as e:
            raise BackendError(f"in-process {graph} failed: {e}") from e

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

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._pool.shutdown(wait=False)
