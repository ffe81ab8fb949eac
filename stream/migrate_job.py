"""One re-tokenisation run, source namespace to target (``hisam tokenizer migrate``), around
stream/retokenize: where the items come from, which namespaces, and what is kept of the run.

The target is always a namespace of its own (blue/green): serving keeps reading the source
until the cut-over, and the source stays for rollback. Every event that cannot be mapped
is written next to the report, one JSON line each, so that a refusal to cut over can be
explained.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from features.store import OnlineStoreConfig
from stream.retokenize import ItemCatalogue, MigrationError, MigrationReport, default_project

if TYPE_CHECKING:
    from models.tokenizer import FrozenTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Namespaces:
    """The source namespace (read only) and the target's options; a target option left None
    defaults to the source's, or to what the new tokenizer implies."""

    from_backend: str = "sqlite"
    from_redis_url: str | None = None
    from_repo_dir: Path = Path("artifacts/feature_repo")
    from_project: str = "hisam"
    from_n_codes: int = 6
    to_backend: str | None = None
    to_redis_url: str | None = None
    to_repo_dir: Path | None = None  # default <from_repo_dir>_<to_project>
    to_project: str | None = None  # default hisam_<new tokenizer version>
    to_n_codes: int | None = None  # default the new tokenizer's
    stream_len: int = 300  # T of both namespaces
    seen_window: int = 1024  # W of both namespaces


@dataclass(frozen=True)
class MigrationOptions:
    batch_users: int = 500  # users read and written per round trip
    verify_sample: int = 1000  # users whose items are decoded in both namespaces
    dry_run: bool = False  # map and report, write nothing
    overwrite: bool = False  # re-run into a target that already holds streams
    feast: bool = True  # apply the target's Feast repo and read it back
    progress: bool = True


def namespace_configs(ns: Namespaces, tokenizer: FrozenTokenizer) -> tuple[OnlineStoreConfig, OnlineStoreConfig]:
    """(source, target) store configs, the target's defaults filled in."""
    source = OnlineStoreConfig(
        backend=ns.from_backend,
        repo_dir=ns.from_repo_dir,
        redis_url=ns.from_redis_url,
        project=ns.from_project,
        stream_len=ns.stream_len,
        n_codes=ns.from_n_codes,
        seen_window=ns.seen_window,
    )
    project = ns.to_project or default_project(tokenizer.version)
    backend = ns.to_backend or ns.from_backend
    target = OnlineStoreConfig(
        backend=backend,
        repo_dir=ns.to_repo_dir or ns.from_repo_dir.with_name(f"{ns.from_repo_dir.name}_{project}"),
        redis_url=(ns.to_redis_url or ns.from_redis_url) if backend == "redis" else None,
        project=project,
        stream_len=ns.stream_len,
        n_codes=ns.to_n_codes or tokenizer.n_codes,
        seen_window=ns.seen_window,
    )
    return source, target


def check_source(config: OnlineStoreConfig) -> None:
    """The source must exist: opening a missing SQLite namespace would create it empty."""
    from features import encoding as enc

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


def read_topic_to_end(bootstrap: str, topic: str, timeout_s: float) -> Iterator[bytes | None]:
    """Every record value of ``topic`` from the beginning up to its end offsets at the start (no group)."""
    from infra.kafka import KafkaConsumer, TopicPartition

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


def catalogue_from_topic(bootstrap: str, topic: str, timeout_s: float, tokenizer: FrozenTokenizer) -> ItemCatalogue:
    """The items as the item-events topic holds them now (the authoritative item source)."""
    from stream.retokenize import catalogue_from_item_events

    return catalogue_from_item_events(read_topic_to_end(bootstrap, topic, timeout_s), tokenizer.modalities)


def run_migration(
    source: OnlineStoreConfig,
    target: OnlineStoreConfig,
    tokenizer: FrozenTokenizer,
    catalogue: ItemCatalogue,
    options: MigrationOptions,
    report_path: Path,
) -> tuple[MigrationReport, Path]:
    """Migrate ``source`` into ``target``; writes the report to ``report_path`` and the unmapped
    events beside it. Returns the report and the unmapped events' path."""
    from features.store import open_feature_store, open_stream_store
    from stream.retokenize import migrate_namespace
    from stream.topics import USER_ACTIONS

    report_path.parent.mkdir(parents=True, exist_ok=True)
    unmapped_path = report_path.with_suffix(".unmapped.jsonl")
    src = open_stream_store(source)
    dst = None if options.dry_run else open_stream_store(target)
    fs = open_feature_store(target) if options.feast and not options.dry_run else None  # the target's own repo
    # What the source had applied before the copy: its streams hold at least that, so the
    # target's workers (a new group) resume from it rather than replay the topic (stream/resume.py).
    applied = {(USER_ACTIONS, p): a for p, a in src.applied_offsets(USER_ACTIONS).items()}
    try:
        with open(unmapped_path, "w") as unmapped_file:
            report = migrate_namespace(
                src, target, tokenizer, catalogue, target=dst,
                batch_users=options.batch_users, verify_sample=options.verify_sample, dry_run=options.dry_run,
                overwrite=options.overwrite, feast_store=fs, progress=options.progress,
                on_unmapped=lambda u: unmapped_file.write(json.dumps({**asdict(u), "old_tokens": list(u.old_tokens)}) + "\n"),
            )  # fmt: skip
        if dst is not None and applied:
            dst.append_batch([], applied=applied)
    finally:
        src.close()
        if dst is not None:
            dst.close()
    report_path.write_text(report.to_json())
    return report, unmapped_path
