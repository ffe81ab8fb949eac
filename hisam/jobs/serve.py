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
process when it exits (serving/app.py).

``--tls-cert``/``--tls-key`` (TLS only), ``--tls-client-ca`` (mutual TLS) and
``--auth-token-file`` (bearer tokens) protect the port (serving/security.py,
docs/operations.md "Security: the Rank port"); ``--reflection`` turns reflection on.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from data import default_data_dir
from hisam.jobs.stream_worker import add_store_arguments, store_config_from_args
from infra import kafka_security
from infra.observability import add_metrics_arguments, metrics_server
from infra.triton_access import add_client_arguments, add_server_arguments, client_access_from_args
from serving.security import add_server_security_arguments, server_security_from_args

if TYPE_CHECKING:
    from serving.app import ServeConfig
    from serving.profiles import Profiles


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
        "--unknown-ttl",
        type=float,
        default=2.0,
        help="seconds an unknown item id stays cached as unknown; a newly ingested item is rankable within it",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="seconds a Rank call may take: the deadline of a call without one and the cap of longer ones",
    )
    parser.add_argument(
        "--store-timeout", type=float, default=2.0, help="seconds one online-store read may take (UNAVAILABLE beyond)"
    )
    parser.add_argument(
        "--health-interval", type=float, default=1.0, help="seconds between health probes of Triton and the store"
    )
    parser.add_argument(
        "--health-timeout",
        type=float,
        default=1.0,
        help="seconds per health probe; a hung dependency is NOT_SERVING within --health-interval + --health-timeout",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=1 << 20,
        help="largest Rank request (RESOURCE_EXHAUSTED beyond); ~100x the 9,145-byte largest legitimate request "
        "at 1,000 candidates",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=256,
        help="calls served at once, health checks included (RESOURCE_EXHAUSTED beyond)",
    )
    parser.add_argument("--reflection", action="store_true", help="turn on gRPC server reflection (off by default)")
    parser.add_argument(
        "--tombstones-bootstrap",
        default=None,
        metavar="H:P",
        help="the broker of user-tombstones: deleted users' anchor caches are dropped at once (default: off)",
    )
    kafka_security.add_arguments(parser)  # for --tombstones-bootstrap (docs/operations.md, Security: Kafka)
    add_server_security_arguments(parser)
    add_client_arguments(parser)
    add_server_arguments(parser)
    add_store_arguments(parser)
    add_metrics_arguments(parser)


def load_profiles(args: argparse.Namespace) -> Profiles:
    """Profile tokens for ``--checkpoint``'s vocabulary, users from ``--dataset`` (none without either)."""
    from serving.app import checkpoint_profile_vocab
    from serving.profiles import Profiles

    vocab = None if args.checkpoint is None else checkpoint_profile_vocab(args.checkpoint)
    if vocab is None:
        return Profiles.empty()
    users = None
    if args.dataset:
        from data import load_dataset

        users = load_dataset(args.dataset, args.data_dir, progress=False).users
    return Profiles.from_vocab(vocab, users)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    from serving.app import ServeConfig

    return ServeConfig(
        model_repo=args.model_repo,
        store=store_config_from_args(args),
        inference=args.inference,
        triton_url=args.triton_url,
        threads=args.threads,
        host=args.host,
        port=args.port,
        max_candidates=args.max_candidates,
        cache_mb=args.cache_mb,
        item_ttl_s=args.item_ttl,
        unknown_ttl_s=args.unknown_ttl,
        request_timeout_s=args.request_timeout,
        store_timeout_s=args.store_timeout,
        health_interval_s=args.health_interval,
        health_timeout_s=args.health_timeout,
        max_message_bytes=args.max_message_bytes,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        security=server_security_from_args(args),
        reflection=args.reflection,
        tombstones_bootstrap=args.tombstones_bootstrap,
        triton_access=client_access_from_args(args),
        triton_admin_key_file=args.triton_admin_key_file,
    )


def _listening(address: str) -> None:
    # The line supervisors wait for (infra/supervisor.py wait_for_line): a log record would start with its time.
    print(f"RankingService listening on {address}", flush=True)


def main(args: argparse.Namespace) -> int:
    from serving.app import run_rank_service
    from serving.repository import publish_version

    if args.checkpoint is not None:
        publish_version(args.model_repo, args.checkpoint, instances=args.instances, threads=args.threads)
    profiles = load_profiles(args)
    with metrics_server(args.metrics_port, args.metrics_addr):
        run_rank_service(serve_config(args), profiles, _listening)
    return 0


if __name__ == "__main__":  # lets benchmarks and supervisors run it without the CLI registry
    from hisam.cli import run_standalone

    run_standalone("hisam serve", __doc__, add_arguments, main)
