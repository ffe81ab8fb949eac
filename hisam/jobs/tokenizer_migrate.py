"""``hisam tokenizer migrate``: controlled re-tokenisation of items and user streams (blue/green).

A new tokenizer version (docs/method.md §1 lifecycle: DST monthly, PT weekly, SFT daily or
faster) changes every item's semantic IDs, and the user streams hold only those IDs.
This command copies the current online-store namespace into a new one under the new
tokenizer (stream/retokenize.py has the steps and the checks); it never writes in
place, so serving keeps reading the old namespace until the cut-over.

The procedure:

1. Stop the stream workers (SIGTERM: each leaves its group after committing the offsets
   of what it acked; what it had not acked stays uncommitted in Kafka). Producers keep
   producing: the topics buffer.
2. Run this command: the new tokenizer, the old namespace (``--from-*``), the new one
   (``--to-*``; default: project ``hisam_<version>`` in its own feature repo). Items come
   from the item-events topic read from the beginning (the authoritative item source) or
   from a dataset (``--items-from dataset``). Exit 0 only if every user was verified and
   no more than ``--max-unmapped`` events were left out (see the report).
3. Restart the stream workers with ``--tokenizer NEW_DIR`` on the new namespace. They
   resume from the committed offsets: actions that arrived since the stop are appended
   to the new streams with the new tokens; actions that were written to the old
   namespace but not committed are redelivered and recognised as duplicates, since the
   seen windows were copied. Nothing is lost, nothing is appended twice.
4. Train the ranker on the new codes (``hisam ranker pretrain``, then ``hisam ranker
   finetune --init pretrain``) and start a near-line trainer from that checkpoint with a
   new state directory (it takes only samples of its tokenizer version). Only then point
   serving at the new namespace and the new model: serving the old model on new codes,
   or the new model on old codes, is wrong. Keep the old namespace (and the old
   tokenizer) for rollback until the new one has served for a while; delete it by hand
   (Redis: the keys ending in the old project; SQLite: its database) when it falls out of
   the last K versions kept.

Exit status: 0 done and verified; 1 verification failed; 2 bad input (nothing written);
3 written and verified, but more than ``--max-unmapped`` events were left out: not ready
for the cut-over until they are understood (they are listed next to the report).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from data import default_data_dir
from features.store import OnlineStoreConfig

log = logging.getLogger(__name__)

EXIT_VERIFY_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNMAPPED = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", type=Path, required=True, help="the NEW frozen tokenizer's artifact dir")
    parser.add_argument(
        "--items-from", choices=["topic", "dataset"], default="topic", help="where item modalities come from"
    )
    parser.add_argument("--bootstrap", default=os.environ.get("HISAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--item-topic", default="item-events")
    parser.add_argument("--topic-timeout", type=float, default=300.0, help="seconds to read the item topic to its end")
    parser.add_argument("--dataset", default="ml-100k", help="with --items-from dataset (data.load_dataset)")
    parser.add_argument("--data-dir", default=default_data_dir())

    src = parser.add_argument_group("source namespace (read only)")
    src.add_argument(
        "--from-backend", choices=["sqlite", "redis"], default=os.environ.get("HISAM_ONLINE_BACKEND", "sqlite")
    )
    src.add_argument("--from-redis-url", default=os.environ.get("HISAM_REDIS_URL"))
    src.add_argument("--from-repo-dir", type=Path, default=Path("artifacts/feature_repo"))
    src.add_argument("--from-project", default="hisam", help="Feast project of the source (the stream's default)")
    src.add_argument("--from-n-codes", type=int, default=6, help="tokens per item under the old tokenizer")

    dst = parser.add_argument_group("target namespace (written)")
    dst.add_argument("--to-backend", choices=["sqlite", "redis"], default=None, help="default: the source's")
    dst.add_argument("--to-redis-url", default=None, help="default: the source's")
    dst.add_argument("--to-repo-dir", type=Path, default=None, help="default: <from-repo-dir>_<to-project>")
    dst.add_argument("--to-project", default=None, help="default: hisam_<new tokenizer version>")
    dst.add_argument("--to-n-codes", type=int, default=None, help="tokens per item (default: the new tokenizer's)")

    parser.add_argument("--stream-len", type=int, default=300, help="T of both namespaces (the workers' --stream-len)")
    parser.add_argument(
        "--seen-window", type=int, default=1024, help="W of both namespaces (the workers' --seen-window)"
    )
    parser.add_argument("--batch-users", type=int, default=500, help="users read and written per round trip")
    parser.add_argument(
        "--verify-sample", type=int, default=1000, help="users whose items are decoded in both namespaces"
    )
    parser.add_argument("--max-unmapped", type=int, default=0, help="unmapped events tolerated for exit status 0")
    parser.add_argument("--dry-run", action="store_true", help="map and report, write nothing")
    parser.add_argument("--overwrite", action="store_true", help="re-run into a target that already holds streams")
    parser.add_argument("--no-feast", action="store_true", help="skip the Feast apply and read of the target")
    parser.add_argument(
        "--report", type=Path, default=None, help="JSON report (default: <to-repo-dir>/retokenize_report.json)"
    )
    parser.add_argument("--no-progress", action="store_true")


def read_topic_to_end(bootstrap: str, topic: str, timeout_s: float) -> Iterator[bytes | None]:
    """Every record value of ``topic`` from the beginning up to its end offsets at the start (no group)."""
    from infra.kafka import KafkaConsumer, TopicPartition
    from stream.retokenize import MigrationError

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, client_id="hisam-migrate"
    )
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise MigrationError(f"topic {topic!r} does not exist on {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        todo = {tp for tp in tps if end[tp] > begin[tp]}  # retention may have emptied a partition
        deadline = time.monotonic() + timeout_s
        n = 0
        while todo:
            if time.monotonic() > deadline:
                raise MigrationError(f"timed out after {timeout_s:.0f}s reading {topic} ({n} records so far)")
            for tp, batch in consumer.poll(timeout_ms=500).items():
                for r in batch:
                    if r.offset < end[tp]:  # the topic as it was at the start; later events go to the workers
                        n += 1
                        yield r.value
            todo = {tp for tp in todo if consumer.position(tp) < end[tp]}
        log.info("read %d item events from %s (%d partitions)", n, topic, len(tps))
    finally:
        consumer.close()


def _configs(args: argparse.Namespace, tokenizer) -> tuple[OnlineStoreConfig, OnlineStoreConfig]:
    from stream.retokenize import default_project

    source = OnlineStoreConfig(
        backend=args.from_backend,
        repo_dir=args.from_repo_dir,
        redis_url=args.from_redis_url,
        project=args.from_project,
        stream_len=args.stream_len,
        n_codes=args.from_n_codes,
        seen_window=args.seen_window,
    )
    project = args.to_project or default_project(tokenizer.version)
    backend = args.to_backend or args.from_backend
    target = OnlineStoreConfig(
        backend=backend,
        repo_dir=args.to_repo_dir or args.from_repo_dir.with_name(f"{args.from_repo_dir.name}_{project}"),
        redis_url=(args.to_redis_url or args.from_redis_url) if backend == "redis" else None,
        project=project,
        stream_len=args.stream_len,
        n_codes=args.to_n_codes or tokenizer.n_codes,
        seen_window=args.seen_window,
    )
    return source, target


def _check_source(config: OnlineStoreConfig) -> None:
    """The source must exist: opening a missing SQLite namespace would create it empty."""
    from features import encoding as enc
    from stream.retokenize import MigrationError

    if config.backend == "sqlite":
        db = config.sqlite_db
        if not db.is_file():
            raise MigrationError(f"no source online store at {db} (--from-repo-dir / --from-backend)")
        table = enc.sqlite_table(config.project, enc.USER_STREAM_FV)
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone()
        if not found:
            raise MigrationError(f"{db} holds no project {config.project!r} (no table {table}; --from-project)")
    else:
        import redis

        try:
            redis.Redis.from_url(config.redis_url).ping()
        except redis.exceptions.ConnectionError as e:
            raise MigrationError(f"the source Redis {config.redis_url} is not reachable: {e}") from e


def main(args: argparse.Namespace) -> int:
    from features.store import open_feature_store, open_stream_store
    from models.tokenizer import FrozenTokenizer
    from stream.retokenize import (
        MigrationError,
        catalogue_from_dataset,
        catalogue_from_item_events,
        check_namespaces,
        migrate_namespace,
    )

    try:
        tokenizer = FrozenTokenizer.load(args.tokenizer)
    except (FileNotFoundError, ValueError, KeyError) as e:
        log.error("cannot load the new tokenizer from %s: %s", args.tokenizer, e)
        return EXIT_BAD_INPUT
    try:
        source, target = _configs(args, tokenizer)
        check_namespaces(source, target, tokenizer)
        _check_source(source)
        if args.items_from == "topic":
            values = read_topic_to_end(args.bootstrap, args.item_topic, args.topic_timeout)
            catalogue = catalogue_from_item_events(values, tokenizer.modalities)
        else:
            from data import load_dataset

            ds = load_dataset(args.dataset, args.data_dir, progress=not args.no_progress)
            catalogue = catalogue_from_dataset(ds.items, int(time.time() * 1000))
    except (MigrationError, ValueError) as e:
        log.error("%s", e)
        return EXIT_BAD_INPUT
    log.info(
        "%d items from the %s; migrating %s -> %s", len(catalogue), args.items_from, source.project, target.project
    )

    report_path = args.report or Path(target.repo_dir) / "retokenize_report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    unmapped_path = report_path.with_suffix(".unmapped.jsonl")
    src = open_stream_store(source)
    dst = None if args.dry_run else open_stream_store(target)
    fs = None if (args.dry_run or args.no_feast) else open_feature_store(target)  # the target's own repo
    try:
        with open(unmapped_path, "w") as unmapped_file:
            report = migrate_namespace(
                src, target, tokenizer, catalogue, target=dst,
                batch_users=args.batch_users, verify_sample=args.verify_sample, dry_run=args.dry_run,
                overwrite=args.overwrite, feast_store=fs, progress=not args.no_progress,
                on_unmapped=lambda u: unmapped_file.write(json.dumps({**asdict(u), "old_tokens": list(u.old_tokens)}) + "\n"),
            )  # fmt: skip
    except MigrationError as e:
        log.error("%s", e)
        return EXIT_BAD_INPUT
    finally:
        src.close()
        if dst is not None:
            dst.close()
    report_path.write_text(report.to_json())
    print(report.table())
    log.info("report: %s; unmapped events: %s", report_path, unmapped_path)
    if report.verified is False:
        log.error(
            "verification failed: the target does not match the source (a worker still writing?): %s",
            report.verify_failures[:3],
        )
        return EXIT_VERIFY_FAILED
    if report.n_unmapped > args.max_unmapped:
        log.error(
            "%d events could not be mapped (--max-unmapped %d): see %s",
            report.n_unmapped,
            args.max_unmapped,
            unmapped_path,
        )
        return EXIT_UNMAPPED
    if not args.dry_run:
        log.info(
            "next: restart the stream workers with --tokenizer %s on project %s (repo %s), train the ranker on the "
            "new codes, then cut serving over", args.tokenizer, target.project, target.repo_dir,
        )  # fmt: skip
    return 0
