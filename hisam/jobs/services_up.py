"""``hisam services up``: run the broker and a private Redis in the foreground until Ctrl-C.

Prints the environment the other commands read (HISAM_KAFKA_BOOTSTRAP, HISAM_REDIS_URL).
For background services in CI or a shell session use ``scripts/services.sh start``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

from infra.services import kafka_broker, redis_server

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kafka-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--redis-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the broker's log here (default: a temp dir)")
    parser.add_argument("--no-redis", action="store_true", help="only the broker (SQLite online store)")


def main(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with ExitStack() as stack:
        broker = stack.enter_context(kafka_broker(args.kafka_port, args.data_dir / "kafka" if args.data_dir else None))
        lines = [f"export HISAM_KAFKA_BOOTSTRAP={broker.bootstrap}"]
        if not args.no_redis:
            redis = stack.enter_context(redis_server(args.redis_port))
            lines.append(f"export HISAM_REDIS_URL={redis.url}")
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        log.info("services up; Ctrl-C stops them")
        stop.wait()
    return 0
