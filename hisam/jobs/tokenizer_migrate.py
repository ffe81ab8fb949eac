"""``hisam tokenizer migrate``: controlled re-tokenisation of items and user streams (blue/green).

A new tokenizer version (docs/method.md §1 lifecycle: DST monthly, PT weekly, SFT daily or
faster) changes every item's semantic IDs, and the user streams hold only those IDs.
This command copies the current online-store namespace into a new one under the new
tokenizer (stream/retokenize has the steps and the checks, stream/migrate_job.py one run); it never writes in
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
import logging
import os
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from data import default_data_dir
from infra import kafka_security

if TYPE_CHECKING:
    from models.tokenizer import FrozenTokenizer
    from stream.migrate_job import Namespaces
    from stream.retokenize import ItemCatalogue

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
    kafka_security.add_arguments(parser)  # TLS, SASL: docs/operations.md, Security: Kafka
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


def _namespaces(args: argparse.Namespace) -> Namespaces:
    """The options of both namespaces (the command line's ``--from-*``, ``--to-*`` and the shared T, W)."""
    from stream.migrate_job import Namespaces

    return Namespaces(**{f.name: getattr(args, f.name) for f in fields(Namespaces)})


def _catalogue(args: argparse.Namespace, tokenizer: FrozenTokenizer) -> ItemCatalogue:
    """The items' modalities: from the item-events topic, or from a dataset."""
    from stream.migrate_job import catalogue_from_topic
    from stream.retokenize import catalogue_from_dataset

    if args.items_from == "topic":
        return catalogue_from_topic(args.bootstrap, args.item_topic, args.topic_timeout, tokenizer)
    from data import load_dataset

    ds = load_dataset(args.dataset, args.data_dir, progress=not args.no_progress)
    return catalogue_from_dataset(ds.items, int(time.time() * 1000))


def main(args: argparse.Namespace) -> int:
    from models.tokenizer import FrozenTokenizer
    from stream.migrate_job import MigrationOptions, check_source, namespace_configs, run_migration
    from stream.retokenize import MigrationError, check_namespaces

    try:
        tokenizer = FrozenTokenizer.load(args.tokenizer)
    except (FileNotFoundError, ValueError, KeyError) as e:
        log.error("cannot load the new tokenizer from %s: %s", args.tokenizer, e)
        return EXIT_BAD_INPUT
    try:
        source, target = namespace_configs(_namespaces(args), tokenizer)
        check_namespaces(source, target, tokenizer)
        check_source(source)
        catalogue = _catalogue(args, tokenizer)
    except (MigrationError, ValueError) as e:
        log.error("%s", e)
        return EXIT_BAD_INPUT
    log.info(
        "%d items from the %s; migrating %s -> %s", len(catalogue), args.items_from, source.project, target.project
    )
    options = MigrationOptions(
        batch_users=args.batch_users,
        verify_sample=args.verify_sample,
        dry_run=args.dry_run,
        overwrite=args.overwrite,
        feast=not args.no_feast,
        progress=not args.no_progress,
    )
    report_path = args.report or Path(target.repo_dir) / "retokenize_report.json"
    try:
        report, unmapped_path = run_migration(source, target, tokenizer, catalogue, options, report_path)
    except MigrationError as e:
        log.error("%s", e)
        return EXIT_BAD_INPUT
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
