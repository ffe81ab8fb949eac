"""``hisam stream worker``: run the stream agents (action appends, item ingestion, dead letters).

Needs a running broker and online store (``scripts/services.sh start`` prints the
addresses; HISAM_KAFKA_BOOTSTRAP / HISAM_REDIS_URL are the defaults). Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from features.store import OnlineStoreConfig
from features.store.base import OnlineStoreError
from infra import kafka_security
from infra.observability import add_metrics_arguments, metrics_server
from stream.app import StreamSettings, run_worker
from stream.deletions import DeletionSettings, namespace_config

log = logging.getLogger(__name__)

# Exit status of a worker that refused to start because the online store holds another
# layout (EX_DATAERR): a restart cannot help, the configuration or the store must change.
EXIT_STORE_LAYOUT = 65


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """Online-store options shared by the stream commands and the stream benchmark."""
    parser.add_argument(
        "--backend", choices=["sqlite", "redis"], default=os.environ.get("HISAM_ONLINE_BACKEND", "sqlite")
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("HISAM_REDIS_URL"),
        help="redis://[user@]host:port/db, rediss:// for TLS (backend redis); keep the password out of it",
    )
    parser.add_argument(
        "--redis-username", default=os.environ.get("HISAM_REDIS_USERNAME"), help="Redis ACL user (else the URL's)"
    )
    parser.add_argument(
        "--redis-password-file",
        type=Path,
        default=os.environ.get("HISAM_REDIS_PASSWORD_FILE"),
        help="file holding the Redis password (read at each new connection: rotation needs no restart)",
    )
    parser.add_argument(
        "--redis-tls-ca", type=Path, default=os.environ.get("HISAM_REDIS_TLS_CA"), help="CA file (rediss://)"
    )
    parser.add_argument("--redis-tls-cert", type=Path, default=None, help="client certificate (rediss://)")
    parser.add_argument("--redis-tls-key", type=Path, default=None, help="client certificate's key (rediss://)")
    parser.add_argument(
        "--repo-dir", type=Path, default=Path("artifacts/feature_repo"), help="Feast repo (yaml, registry, SQLite db)"
    )
    parser.add_argument(
        "--project",
        default=os.environ.get("HISAM_FEAST_PROJECT", "hisam"),
        help="Feast project: the online-store namespace (a re-tokenised one is hisam_<tokenizer version>)",
    )
    parser.add_argument("--stream-len", type=int, default=300, help="T: items kept per user")
    parser.add_argument("--n-codes", type=int, default=6, help="semantic-ID tokens per item")
    parser.add_argument(
        "--seen-window",
        type=int,
        default=1024,
        help="W: event ids remembered per user for idempotency (at least 2 x --batch-size)",
    )


def store_config_from_args(args: argparse.Namespace) -> OnlineStoreConfig:
    return OnlineStoreConfig(
        backend=args.backend,
        repo_dir=args.repo_dir,
        redis_url=args.redis_url,
        redis_username=getattr(args, "redis_username", None),
        redis_password_file=getattr(args, "redis_password_file", None),
        redis_tls_ca=getattr(args, "redis_tls_ca", None),
        redis_tls_cert=getattr(args, "redis_tls_cert", None),
        redis_tls_key=getattr(args, "redis_tls_key", None),
        project=args.project,
        stream_len=args.stream_len,
        n_codes=args.n_codes,
        seen_window=args.seen_window,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=os.environ.get("HISAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    kafka_security.add_arguments(parser)  # TLS, SASL: docs/operations.md, Security: Kafka
    add_store_arguments(parser)
    parser.add_argument("--tokenizer", type=Path, default=None, help="frozen tokenizer dir; enables item ingestion")
    parser.add_argument("--app-id", default="hisam-stream", help="consumer group (workers with one id share the load)")
    parser.add_argument("--batch-size", type=int, default=500, help="records per batch at most")
    parser.add_argument(
        "--within-ms", type=float, default=0.0, help="how long an idle worker waits to fill a batch (adds to freshness)"
    )
    parser.add_argument("--partitions", type=int, default=4, help="partitions of topics created by this worker")
    parser.add_argument(
        "--instance-id",
        default=os.environ.get("HISAM_INSTANCE_ID") or socket.gethostname(),
        help="static group member id, unique per worker (default: $HISAM_INSTANCE_ID or the host name)",
    )
    parser.add_argument(
        "--session-timeout", type=float, default=10.0, help="seconds before a dead worker's partitions move"
    )
    d = StreamSettings
    hostile = parser.add_argument_group("hostile input and topic safety (docs/operations.md)")
    hostile.add_argument(
        "--max-event-future",
        type=float,
        default=d.max_event_future_s,
        help="seconds an event time may lie ahead of the worker's clock (beyond: dead letter event_time_out_of_range)",
    )
    hostile.add_argument(
        "--max-event-past",
        type=float,
        default=d.max_event_past_s,
        help="seconds an event time may lie behind the worker's clock (default: unbounded, replays carry old times)",
    )
    hostile.add_argument(
        "--unknown-item-retry",
        type=float,
        default=d.unknown_item_retry_s,
        help="seconds between retries of an action whose item has no semantic IDs yet",
    )
    hostile.add_argument(
        "--unknown-item-max-age",
        type=float,
        default=d.unknown_item_max_age_s,
        help="seconds an action waits for its item before it is dead-lettered as unknown_item (0: at once)",
    )
    hostile.add_argument(
        "--dead-letter-value-bytes",
        type=int,
        default=d.dead_letter_value_bytes,
        help="bytes of a bad record's value its dead letter keeps (sizes and SHA-256 of the whole are kept)",
    )
    hostile.add_argument(
        "--producer-request-timeout",
        type=float,
        default=d.producer_request_timeout_s,
        help="seconds the broker has to acknowledge a produce request (then the worker exits before its ack)",
    )
    hostile.add_argument(
        "--topic-replication",
        type=int,
        default=d.topic_replication,
        help="replication factor of topics this worker creates (production: 3)",
    )
    hostile.add_argument(
        "--min-insync-replicas",
        type=int,
        default=d.min_insync_replicas,
        help="min.insync.replicas of topics this worker creates (default: the broker's; production: 2)",
    )
    deletion = parser.add_argument_group("user deletion and retention (docs/operations.md, User deletion)")
    deletion.add_argument(
        "--deletion-grace",
        type=float,
        default=DeletionSettings().grace_s,
        help="seconds after a user's deletion during which its actions are dropped (longer than any lag)",
    )
    deletion.add_argument(
        "--delete-also",
        action="append",
        default=[],
        metavar="PROJECT[@REPO_DIR]",
        help="another namespace (an older re-tokenisation one) to delete users from too; repeatable",
    )
    deletion.add_argument(
        "--stream-ttl",
        type=float,
        default=0.0,
        help="seconds after its last append a user's whole state expires (0: kept until deleted)",
    )
    add_metrics_arguments(parser)


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> StreamSettings:
    """The worker's settings; two come from its environment, not its options:
    ``HISAM_IDLE_FETCH_MS`` (the pause after an empty fetch, ``StreamSettings.idle_fetch_s``)
    and ``HISAM_FAULT_EXIT_AFTER_APPENDS`` (fault injection: tests set it for a worker they
    start; unset or 0: off)."""
    store = replace(store_config_from_args(args), stream_ttl_s=args.stream_ttl)
    also = tuple(namespace_config(store, spec) for spec in args.delete_also)
    return StreamSettings(
        bootstrap=args.bootstrap,
        store=store,
        app_id=args.app_id,
        tokenizer_dir=args.tokenizer,
        batch_size=args.batch_size,
        batch_within_s=args.within_ms / 1000.0,
        partitions=args.partitions,
        session_timeout_s=args.session_timeout,
        instance_id=args.instance_id or None,
        max_event_future_s=args.max_event_future,
        max_event_past_s=args.max_event_past,
        unknown_item_retry_s=args.unknown_item_retry,
        unknown_item_max_age_s=args.unknown_item_max_age,
        dead_letter_value_bytes=args.dead_letter_value_bytes,
        producer_request_timeout_s=args.producer_request_timeout,
        topic_replication=args.topic_replication,
        min_insync_replicas=args.min_insync_replicas,
        deletion=DeletionSettings(args.deletion_grace, also),
        idle_fetch_s=float(environ.get("HISAM_IDLE_FETCH_MS", "5")) / 1000,
        fault_exit_after_appends=int(environ.get("HISAM_FAULT_EXIT_AFTER_APPENDS", "0")) or None,
    )


def main(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, os.environ)
    log.info("stream worker %s on %s, store %s", settings.app_id, settings.bootstrap, settings.store.backend)
    with metrics_server(args.metrics_port, args.metrics_addr):
        try:
            run_worker(settings, loglevel="debug" if getattr(args, "verbose", False) else "info")
        except OnlineStoreError as e:  # e.g. the stored layout differs from --n-codes / --stream-len
            log.error("the stream worker cannot start: %s", e)
            return EXIT_STORE_LAYOUT
    return 0


if __name__ == "__main__":  # lets tests and supervisors run it without the CLI registry
    from hisam.cli import run_standalone

    run_standalone("hisam stream worker", __doc__, add_arguments, main)
