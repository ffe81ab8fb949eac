"""``hisam user delete USER...``: request the deletion of users' data (docs/operations.md, User deletion).

Writes one ``UserDeletion`` per user to the ``user-deletions`` topic (keyed by user id, as
``user-actions``) and waits for the broker's acknowledgement. The stream workers delete each
user from every namespace they serve and emit a tombstone (``user-tombstones``), on which
Rank servers drop the user's anchor cache entry and the trainer skips the user's pending
samples (stream/deletions.py). ``--wait S`` also waits up to S seconds for a tombstone of
every user, and exits 1 if one does not come.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import time

from infra import kafka_security

log = logging.getLogger(__name__)

EXIT_NOT_CONFIRMED = 1


def user_id(text: str) -> int:
    try:
        u = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a user id: {text!r} (a non-negative integer)") from None
    if u < 0 or u >= 1 << 63:
        raise argparse.ArgumentTypeError(f"not a user id: {text} (a non-negative 64-bit integer)")
    return u


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("users", nargs="+", type=user_id, metavar="USER", help="user ids to delete")
    parser.add_argument("--bootstrap", default=os.environ.get("HISAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    kafka_security.add_arguments(parser)  # TLS, SASL: docs/operations.md, Security: Kafka
    parser.add_argument("--reason", default="", help="why, for the audit trail (at most 256 bytes; no personal data)")
    parser.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait for every user's tombstone (0: do not wait)"
    )


class TombstoneWatch:
    """Tombstones from now on (every partition of user-tombstones, from its end)."""

    def __init__(self, bootstrap: str) -> None:
        from infra.kafka import TopicPartition, consumer
        from stream import topics as tp

        self._c = consumer(bootstrap, client_id="hisam-user-delete")
        parts = self._c.partitions_for_topic(tp.USER_TOMBSTONES) or set()
        if not parts:
            self._c.close()
            raise SystemExit(f"no topic {tp.USER_TOMBSTONES} on {bootstrap}: start a stream worker first")
        tps = [TopicPartition(tp.USER_TOMBSTONES, p) for p in sorted(parts)]
        self._c.assign(tps)
        self._c.seek_to_end(*tps)
        for t in tps:
            self._c.position(t)  # resolve the end now, before the deletions are sent

    def wait(self, users: set[int], timeout_s: float) -> dict[int, object]:
        from hisam_pb.v1 import events_pb2 as pb

        got: dict[int, object] = {}
        deadline = time.monotonic() + timeout_s
        while set(got) < users and time.monotonic() < deadline:
            for records in self._c.poll(timeout_ms=200).values():
                for r in records:
                    t = pb.UserTombstone.FromString(r.value)
                    if t.user_id in users:
                        got[t.user_id] = t
        return got

    def close(self) -> None:
        self._c.close()


def request_deletions(bootstrap: str, users: list[int], reason: str = "") -> list[tuple[int, int, int]]:
    """Produce the deletion requests; (user, partition, offset) of each, once acknowledged."""
    from infra.kafka import consumer
    from stream import topics as tp
    from stream.deletions import deletion_record
    from stream.producer import make_producer

    c = consumer(bootstrap, client_id="hisam-user-delete")
    try:
        if not c.partitions_for_topic(tp.USER_DELETIONS):
            raise SystemExit(
                f"no topic {tp.USER_DELETIONS} on {bootstrap}: start a stream worker first (it creates it)"
            )
    finally:
        c.close()
    records = [deletion_record(u, reason) for u in users]
    producer = make_producer(bootstrap, linger_ms=0)
    try:
        futures = [producer.send(tp.USER_DELETIONS, key=k, value=v) for k, v in records]
        producer.flush(timeout=30)
        return [(u, f.get(timeout=30).partition, f.get(timeout=30).offset) for u, f in zip(users, futures)]
    finally:
        producer.close()


def main(args: argparse.Namespace) -> int:
    users = list(dict.fromkeys(args.users))
    if len(args.reason.encode("utf-8")) > 256:
        raise SystemExit("--reason is at most 256 bytes")
    watch = TombstoneWatch(args.bootstrap) if args.wait > 0 else None
    try:
        for u, part, off in request_deletions(args.bootstrap, users, args.reason):
            print(f"user {u}: deletion requested (user-deletions[{part}]@{off})")
        if watch is None:
            return 0
        got = watch.wait(set(users), args.wait)
    finally:
        if watch is not None:
            watch.close()
    for u in users:
        t = got.get(u)
        if t is None:
            print(f"user {u}: no tombstone within {args.wait:g}s (is a stream worker running?)")
            continue
        until = dt.datetime.fromtimestamp(t.until_ms / 1000, dt.UTC).isoformat(timespec="seconds")
        print(f"user {u}: deleted from {', '.join(t.projects)} by {t.app_id}; its actions are dropped until {until}")
    return 0 if len(got) == len(users) else EXIT_NOT_CONFIRMED


if __name__ == "__main__":
    from hisam.cli import run_standalone

    run_standalone("hisam user delete", __doc__, add_arguments, main)
