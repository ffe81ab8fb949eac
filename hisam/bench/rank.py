"""``hisam bench rank``: the Rank API end to end (gRPC + Triton) against the model's pure compute.

Setup: the CPU-preset HMAT (random weights: speed does not depend on what they mean),
exported and published to a fresh model repository; a real ``tritonserver`` (Python backend
running ONNX Runtime) on it; ``hisam serve`` as its own process (so that client and server
do not share a GIL) reading a SQLite online store holding ``--users`` users with a
``--history``-item stream each; candidates drawn from ``--items`` items.

Measured, one request = one user + ``--candidates`` distinct candidates:
- Rank p50/p99 and QPS, closed loop (``serving.load.rank_load``: one gRPC channel per
  client, every answer checked against the Rank contract) with 1, 8 and 16 concurrent
  clients (``--concurrency``), anchor-cache path (warm: every user's history already
  encoded, the steady state of a user who is ranked more than once per action); errors and
  malformed answers are counted per run, not raised;
- the same with the cache off (``--cache-mb 0``: full recompute of history + candidates);
- the model's pure ONNX Runtime compute for the same request in this process (the same
  graph and thread count as Triton uses): ``score_with_cache`` (what a warm Rank runs) and
  ``ranking`` (full recompute);
- the two Triton models called directly for the same request (no Rank server).

Keys of the JSON line: ``p50_ms``, ``p99_ms``, ``qps`` (1 client, cached path),
``e2e_over_model_p50`` (Rank p50 over ORT score_with_cache p50; target <= 1.5),
``cache_speedup`` (full recompute over anchor-cache path, both Rank through Triton, 1
client; target >= 5), ``clients16`` (the 16-client cached run: p50_ms, p99_ms, qps, errors),
and per-concurrency / per-path details in ``runs``. The export is kept under
``--work-dir`` keyed by the config, since it takes a minute or two on a small CPU.
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--history", type=int, default=300, help="history items per user (T)")
    parser.add_argument("--candidates", type=int, default=100, help="candidates per request (N)")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each closed-loop run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (Triton and baseline)")
    parser.add_argument("--instances", type=int, default=1, help="Triton instances per model")
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts/bench/rank"), help="export cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--calls", type=int, default=12, help="per-call timings of each graph, before and after the runs"
    )


def _export(work_dir: Path, seed: int) -> Path:
    import torch

    from export.graphs import export_all, graph_key
    from models.hmat.model import HMAT, hmat_cpu

    config = hmat_cpu()
    out = work_dir / f"export-{graph_key(config, str(seed))}"
    if not (out / "score_with_cache.onnx").is_file():
        torch.manual_seed(seed)
        log.info("exporting the CPU-preset HMAT to %s (a minute or two)", out)
        export_all(HMAT(config).eval(), out.with_suffix(".tmp"), tokenizer_version=None)
        out.with_suffix(".tmp").rename(out)
    return out


def _fill_store(cfg, args, rng: np.random.Generator, k: int, codebook: int) -> None:
    from features.store import ItemSids, StreamAction, open_stream_store

    store = open_stream_store(cfg)
    tokens = rng.integers(codebook, size=(args.items, k)) + np.arange(k) * codebook
    store.put_item_sids([ItemSids(i, tuple(map(int, tokens[i])), "", 0) for i in range(args.items)])
    actions = []
    for u in range(args.users):
        for t, i in enumerate(rng.integers(args.items, size=args.history)):
            actions.append(
                StreamAction(u, f"b{u}-{t}", int(i), int(rng.integers(1, 7)), 1 + t, tuple(map(int, tokens[i])))
            )
    store.append_batch(actions, want_history=False)
    store.close()


def _requests(args, rng: np.random.Generator, n: int) -> list[tuple[int, list[int]]]:
    return [
        (int(rng.integers(args.users)), rng.choice(args.items, size=args.candidates, replace=False).tolist())
        for _ in range(n)
    ]


async def _each_once(address: str, requests) -> None:
    from hisam_pb.v1 import rank_pb2, rank_pb2_grpc
    from serving.security import rank_channel

    async with rank_channel(address, aio=True) as channel:
        stub = rank_pb2_grpc.RankingServiceStub(channel)
        for user, items in requests:
            await stub.Rank(rank_pb2.RankRequest(user_id=user, item_ids=items), timeout=60)


def _server_args(args, repo: Path, store_dir: Path, triton_url: str, cache_mb: float) -> list[str]:
    return [
        "--model-repo", str(repo), "--triton-url", triton_url, "--backend", "sqlite", "--repo-dir", str(store_dir),
        "--stream-len", str(args.history), "--cache-mb", str(cache_mb), "--max-candidates", str(max(1000, args.candidates)),
    ]  # fmt: skip


async def _model_calls(args, repo: Path, store_cfg, triton_url: str, reqs, reps: int) -> dict[str, list[float]]:
    """Per-call latency (ms) of the graphs for the same requests: ORT in-process and Triton direct."""
    import torch

    from export.graphs import cache_feed, cache_from_outputs, ranking_feed, stream_feed
    from features.store import open_stream_store
    from models.hmat.sequence import build_stream
    from serving.backends import ENCODE_OUTPUTS, OrtBackend, TritonBackend
    from serving.online import OnlineReader, history_of
    from serving.profiles import Profiles
    from serving.ranking import Ranker, model_info

    info = model_info(repo)
    ort_backend = OrtBackend(repo, threads=args.threads)
    triton = TritonBackend(triton_url)
    ranker = Ranker(triton, OnlineReader(open_stream_store(store_cfg)), Profiles.empty(), info)
    times: dict[str, list[float]] = {k: [] for k in ("read", "ort_cached", "ort_full", "triton_cached", "triton_full")}

    async def timed(name: str, coro) -> None:
        t0 = time.perf_counter()
        await coro
        times[name].append((time.perf_counter() - t0) * 1e3)

    async def ort(graph: str, feed) -> None:
        ort_backend.run_sync(graph, feed, ("scores",))

    try:
        for user, items in reqs[:reps]:
            # Exactly what the server sends, built with the ranker's own helpers.
            stream, sids = await asyncio.gather(ranker.reader.user_stream(user), ranker.reader.item_sids(items))
            await timed("read", asyncio.gather(ranker.reader.user_stream(user), ranker.reader.item_sids(items)))
            history = history_of(stream, info.codebook_size)
            scorable, _ = ranker._candidates(items, sids)
            codes = np.stack([scorable[i] for i in sorted(scorable)])
            hist_feed = stream_feed(build_stream([ranker._user((), history)], info.layout), info.rope)
            full_feed = ranking_feed(build_stream([ranker._user((), history, codes)], info.layout), info.rope)
            enc = ort_backend.run_sync("encode_history", hist_feed, ENCODE_OUTPUTS)
            feed = cache_feed(cache_from_outputs(enc), torch.from_numpy(codes[None]))
            await timed("ort_cached", ort("score_with_cache", feed))
            await timed("ort_full", ort("ranking", full_feed))
            await timed("triton_cached", triton.score_with_cache(feed))
            await timed("triton_full", triton.rank(full_feed))
    finally:
        await triton.close()
        await ort_backend.close()
    return times


def main(args: argparse.Namespace) -> int:
    from features.store import OnlineStoreConfig
    from infra.triton import triton_server
    from serving.load import rank_load, serve_process
    from serving.repository import publish_version

    rng = np.random.default_rng(args.seed)
    export_dir = _export(args.work_dir, args.seed)
    from models.hmat.model import hmat_cpu

    config = hmat_cpu()
    result: dict = {"bench": "rank", "history": args.history, "candidates": args.candidates, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="hisam-bench-rank-") as tmp:
        tmp = Path(tmp)
        repo = tmp / "repo"
        publish_version(repo, export_dir, instances=args.instances, threads=args.threads)
        store_cfg = OnlineStoreConfig(
            backend="sqlite", repo_dir=tmp / "store", stream_len=args.history, n_codes=config.n_sid
        )
        _fill_store(store_cfg, args, rng, config.n_sid, config.codebook_size)
        reqs = _requests(args, rng, 2000)
        with triton_server(repo, log_dir=tmp / "triton") as triton:
            # Per-call timings before and after the closed loops: on a shared machine the load
            # drifts, and a baseline taken in one window only would bias the ratio.
            calls = asyncio.run(_model_calls(args, repo, store_cfg, triton.url, reqs, args.calls))
            rows = []
            for path, cache_mb in (("cached", 256.0), ("full", 0.0)):
                server_args = _server_args(args, repo, store_cfg.repo_dir, triton.url, cache_mb)
                with serve_process(server_args, tmp / f"serve-{path}.log") as served:
                    warm = [(u, reqs[u][1]) for u in range(args.users)]  # every user once: the caches exist
                    asyncio.run(_each_once(served.address, warm))
                    for c in args.concurrency:
                        run = asyncio.run(rank_load(served.address, reqs, c, args.seconds))
                        row = {
                            "path": path,
                            "clients": c,
                            "p50_ms": run.percentile_ms(50),
                            "p99_ms": run.percentile_ms(99),
                            "qps": run.summary()["qps"],
                            "n": len(run.latencies_ms),
                            "errors": sum(run.errors.values()) + run.n_malformed,
                        }
                        if row["errors"]:
                            log.warning("%s: %s %s", row, run.error_details[:3], run.malformed[:3])
                        rows.append(row)
                        log.info("%s", row)
            after = asyncio.run(_model_calls(args, repo, store_cfg, triton.url, reqs[args.calls :], args.calls))
            calls = {k: v + after[k] for k, v in calls.items()}
    med = {k: statistics.median(v) for k, v in calls.items()}
    by = {(r["path"], r["clients"]): r for r in rows}
    c1 = by[("cached", 1)]
    result |= {
        "p50_ms": c1["p50_ms"],
        "p99_ms": c1["p99_ms"],
        "qps": c1["qps"],
        "e2e_over_model_p50": c1["p50_ms"] / med["ort_cached"],
        "cache_speedup": by[("full", 1)]["p50_ms"] / c1["p50_ms"],
        "triton_cache_speedup": med["triton_full"] / med["triton_cached"],
        "model_p50_ms": {k: round(v, 3) for k, v in med.items()},
        "clients16": by.get(("cached", 16)),
        "runs": rows,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    print(f"Rank benchmark: T={args.history} history items, N={args.candidates} candidates, CPU preset, "
          f"{args.threads} ORT thread(s), {os.cpu_count()} CPUs (numbers are noisy on a shared machine)")  # fmt: skip
    print(f"  {'path':<8} {'clients':>7} {'p50 ms':>9} {'p99 ms':>9} {'QPS':>8} {'requests':>9} {'errors':>7}")
    for r in rows:
        print(
            f"  {r['path']:<8} {r['clients']:>7} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['qps']:>8.1f} {r['n']:>9}"
            f" {r['errors']:>7}"
        )
    print("  per call p50 (same requests): " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
    print(
        f"  end-to-end p50 over ORT compute p50 (score_with_cache): {result['e2e_over_model_p50']:.2f}x (target <= 1.5x)"
    )
    print(f"  anchor-cache path vs full recompute, Rank through Triton: {result['cache_speedup']:.1f}x (target >= 5x); "
          f"Triton model calls alone: {result['triton_cache_speedup']:.1f}x")  # fmt: skip
    print(json.dumps(result))
    return 0
