"""``hisam serve``: the gRPC Rank API over a Triton-served HMAT model (serving/).

By default it starts the embedded Triton (``scripts/install_triton.sh`` installs it) on
``--model-repo``; ``--triton-url`` uses a running one instead, and ``--inference ort`` runs
the graphs in this process. ``--checkpoint`` first publishes a ranker checkpoint as a new
version of the repository (a version already there is not published twice). The user
streams and item IDs are read from the online store the stream worker writes (same store
options). Runs until SIGTERM / Ctrl-C, then drains in-flight calls.

``--metrics-port`` serves Prometheus ``/metrics`` (infra/observability.py: Rank calls and
latency by status, Triton latency, caches, the model version answering, dependency health).
When Triton stops, Rank answers UNAVAILABLE and health NOT_SERVING until it is back, with no
restart of this server (serving/server.py); the embedded Triton is restarted by this
process when it exits (infra/triton.py ``supervised_triton_server``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from data import default_data_dir
from hisam.jobs.stream_worker import add_store_arguments, store_config_from_args
from infra.observability import add_metrics_arguments, metrics_server

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port of the Rank API (0: any free port)")
    parser.add_argument("--model-repo", type=Path, default=Path("artifacts/model_repo"), help="Triton model repository")
    parser.add_argument("--checkpoint", type=Path, default=None, help="ranker checkpoint to publish before serving")
    parser.add_argument("--dataset", default=None, help="users table for profile tokens (with --checkpoint's vocab)")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--inference", choices=["triton", "ort"], default="triton", help="Triton, or in-process ORT")
    parser.add_argument(
        "--triton-url", default=os.environ.get("HISAM_TRITON_URL"), help="host:port of a running Triton"
    )
    parser.add_argument("--instances", type=int, default=1, help="Triton model instances per model (publish)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per instance")
    parser.add_argument("--max-candidates", type=int, default=1000)
    parser.add_argument("--cache-mb", type=float, default=256.0, help="anchor KV cache budget (0: always recompute)")
    parser.add_argument("--item-ttl", type=float, default=60.0, help="seconds an item's semantic IDs stay cached")
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="seconds a Rank call without a deadline may take"
    )
    parser.add_argument(
        "--health-interval", type=float, default=1.0, help="seconds between health probes of Triton and the store"
    )
    add_store_arguments(parser)
    add_metrics_arguments(parser)


def load_profiles(args: argparse.Namespace):
    from serving.profiles import Profiles

    if args.checkpoint is None:
        return Profiles.empty()
    from features.profiles import ProfileVocab
    from models.hmat.checkpoint import read_checkpoint_config

    cfg = read_checkpoint_config(args.checkpoint)
    if "profile_vocab" not in cfg:
        return Profiles.empty()
    users = None
    if args.dataset:
        from data import load_dataset

        users = load_dataset(args.dataset, args.data_dir, progress=False).users
    return Profiles.from_vocab(ProfileVocab.from_dict(cfg["profile_vocab"]), users)


def make_ranker(args: argparse.Namespace, triton_url: str | None, profiles):
    """The Ranker for these options; call it on the serving event loop."""
    from features.store import open_stream_store
    from serving.backends import OrtBackend, TritonBackend
    from serving.online import OnlineReader
    from serving.ranking import Ranker, model_info

    backend = TritonBackend(triton_url) if args.inference == "triton" else OrtBackend(args.model_repo, args.threads)
    reader = OnlineReader(open_stream_store(store_config_from_args(args)), item_ttl_s=args.item_ttl)
    return Ranker(
        backend,
        reader,
        profiles,
        model_info(args.model_repo),
        max_candidates=args.max_candidates,
        cache_bytes=int(args.cache_mb * (1 << 20)),
        default_timeout_s=args.request_timeout,
    )


async def _serve(args: argparse.Namespace, triton_url: str | None, profiles) -> None:
    from serving.server import rank_server

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ranker = make_ranker(args, triton_url, profiles)
    try:
        async with rank_server(ranker, args.host, args.port, health_interval_s=args.health_interval) as handle:
            print(f"RankingService listening on {handle.address}", flush=True)
            await stop.wait()
            log.info("shutting down: draining in-flight calls")
    finally:
        await ranker.backend.close()


def main(args: argparse.Namespace) -> int:
    from serving.repository import publish_version

    if args.checkpoint is not None:
        publish_version(args.model_repo, args.checkpoint, instances=args.instances, threads=args.threads)
    profiles = load_profiles(args)
    with contextlib.ExitStack() as stack:
        stack.enter_context(metrics_server(args.metrics_port, args.metrics_addr))
        url = args.triton_url
        if args.inference == "triton" and url is None:
            from infra.triton import supervised_triton_server

            url = stack.enter_context(supervised_triton_server(args.model_repo)).url
        asyncio.run(_serve(args, url, profiles))
    return 0


if __name__ == "__main__":  # lets benchmarks and supervisors run it without the CLI registry
    from hisam.cli import run_standalone

    run_standalone("hisam serve", __doc__, add_arguments, main)
