"""Steps 1-3 in order, into a new namespace, and the report of what they did."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from tqdm import tqdm

from features import encoding as enc
from features.store import ItemSids, NamespaceStore, OnlineStoreConfig, SidClaim, open_stream_store
from stream.retokenize.items import ItemCatalogue, check_catalogue, encode_catalogue, read_item_table
from stream.retokenize.plan import MigrationError, check_namespaces, namespace_of
from stream.retokenize.streams import UnmappedEvent, build_token_map, migrate_state
from stream.retokenize.verify import verify_namespace

if TYPE_CHECKING:
    from feast import FeatureStore

    from models.tokenizer import FrozenTokenizer

log = logging.getLogger(__name__)


@dataclass
class MigrationReport:
    """What a migration did; ``to_json`` is the file, ``table`` the summary printed."""

    source: str
    target: str
    new_tokenizer_version: str
    old_tokenizer_versions: dict[str, int]  # version -> items of the old table
    dry_run: bool
    items_in_source: int = 0  # usable items of the item source
    items_rejected: dict[str, int] = field(default_factory=dict)
    items_written: int = 0
    items_reassigned: int = 0  # last code moved by the collision rule
    old_items: int = 0
    users: int = 0
    events: int = 0
    events_mapped: int = 0
    unmapped: dict[str, int] = field(default_factory=dict)  # reason -> events
    users_with_unmapped: int = 0
    unmapped_examples: list[dict] = field(default_factory=list)
    verified: bool | None = None  # None: not verified (dry run)
    verified_users: int = 0
    sampled_users: int = 0
    feast_checked_users: int = 0
    verify_failures: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_unmapped(self) -> int:
        return sum(self.unmapped.values())

    @property
    def users_per_s(self) -> float:
        s = self.seconds.get("streams", 0.0)
        return self.users / s if s > 0 else 0.0

    @property
    def events_per_s(self) -> float:
        s = self.seconds.get("streams", 0.0)
        return self.events / s if s > 0 else 0.0

    def to_json(self) -> str:
        doc = asdict(self)
        doc.update(n_unmapped=self.n_unmapped, users_per_s=self.users_per_s, events_per_s=self.events_per_s)
        return json.dumps(doc, indent=2)

    def table(self) -> str:
        unm = ", ".join(f"{k} {v}" for k, v in sorted(self.unmapped.items())) or "none"
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.items_rejected.items())) or "none"
        verdict = {None: "not run (dry run)", True: "passed", False: f"FAILED ({len(self.verify_failures)} shown)"}
        items = (
            f"{self.items_written} written of {self.items_in_source} in the item source ({self.items_reassigned} "
            f"moved by the collision rule; rejected: {rej}); old table {self.old_items}"
        )
        verify = (
            f"{verdict[self.verified]}: {self.verified_users} users, {self.sampled_users} decoded to item ids, "
            f"{self.feast_checked_users} through Feast"
        )
        rows = [
            ("source", self.source),
            ("target", self.target + ("  (dry run: nothing written)" if self.dry_run else "")),
            ("tokenizer", f"{', '.join(self.old_tokenizer_versions) or '-'} -> {self.new_tokenizer_version}"),
            ("items", items),
            ("users", f"{self.users} ({self.users_with_unmapped} with unmapped events)"),
            ("events", f"{self.events} ({self.events_mapped} mapped)"),
            ("unmapped", f"{self.n_unmapped} ({unm})"),
            ("verify", verify),
            ("time", ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())),
            ("rate", f"{self.users_per_s:,.0f} users/s, {self.events_per_s:,.0f} events/s"),
        ]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def migrate_namespace(
    source: NamespaceStore,
    target_config: OnlineStoreConfig,
    tokenizer: FrozenTokenizer,
    catalogue: ItemCatalogue,
    *,
    target: NamespaceStore | None = None,
    batch_users: int = 500,
    verify_sample: int = 1000,
    dry_run: bool = False,
    overwrite: bool = False,
    feast_store: FeatureStore | None = None,
    on_unmapped: Callable[[UnmappedEvent], None] | None = None,
    max_examples: int = 100,
    progress: bool = True,
    seed: int = 0,
) -> MigrationReport:
    """Steps 1-3 of the package doc; returns the report (``verified`` False on any mismatch).

    ``target`` is the store opened on ``target_config`` (opened and closed here if not
    given; never opened in a dry run, which writes nothing). ``on_unmapped`` receives
    every unmapped event (the report keeps ``max_examples``); ``feast_store`` (opened on
    the target's repo) adds the Feast read of the sampled users. Raises MigrationError
    before writing anything when the inputs do not fit together.
    """
    t_all = time.perf_counter()
    check_namespaces(source.config, target_config, tokenizer)
    if target is not None and namespace_of(target.config) != namespace_of(target_config):
        raise MigrationError(f"the target store is {namespace_of(target.config)}, not {namespace_of(target_config)}")
    with contextlib.ExitStack() as stack:
        if target is None and not dry_run:
            target = open_stream_store(target_config)
            stack.callback(target.close)
        if not dry_run and not overwrite:
            there = len(target.entity_ids(enc.USER_ID_KEY))
            if there:
                raise MigrationError(
                    f"the target {namespace_of(target_config)} already holds {there} user streams: pass overwrite "
                    "(--overwrite) to re-run a migration into it, and only while no stream worker writes there"
                )
        report = MigrationReport(
            source=namespace_of(source.config),
            target=namespace_of(target_config),
            new_tokenizer_version=tokenizer.version,
            old_tokenizer_versions={},
            dry_run=dry_run,
        )

        # Step 1: the old item table (to invert) and the new encoding of the item source.
        t0 = time.perf_counter()
        old_items = read_item_table(source, source.entity_ids(enc.ITEM_ID_KEY))
        user_ids = source.entity_ids(enc.USER_ID_KEY)
        if not old_items and not len(user_ids):
            raise MigrationError(
                f"the source {namespace_of(source.config)} holds no items and no users (--from-project?)"
            )
        report.old_items = len(old_items)
        report.old_tokenizer_versions = dict(Counter(it.tokenizer_version for it in old_items.values()))
        widths = {len(it.tokens) for it in old_items.values()}
        if widths - {source.config.n_codes}:
            raise MigrationError(
                f"the source's items have {sorted(widths)} tokens each, the source store is configured for "
                f"{source.config.n_codes} (--from-n-codes)"
            )
        cat = check_catalogue(tokenizer, catalogue)
        report.items_in_source, report.items_rejected = len(cat), dict(cat.rejected)
        tokens, moved = encode_catalogue(tokenizer, cat)
        report.items_reassigned = int(moved.sum())
        new_items = dict(zip(cat.item_ids.tolist(), map(tuple, tokens.tolist())))
        tmap = build_token_map({i: it.tokens for i, it in old_items.items()}, new_items)
        if not dry_run:
            sids = [
                ItemSids(int(i), t, tokenizer.version, int(ms))
                for i, t, ms in zip(cat.item_ids.tolist(), map(tuple, tokens.tolist()), cat.event_time_ms.tolist())
            ]
            for start in range(0, len(sids), 5000):
                chunk = sids[start : start + 5000]
                # The target's ID index (what item ingestion claims against): the catalogue
                # is collision-free, so each item gets exactly its ID.
                got = target.claim_item_sids([SidClaim(it.item_id, it.tokens[:-1], it.tokens[-1:]) for it in chunk])
                taken = [it.item_id for it, g in zip(chunk, got) if g != it.tokens]
                if taken:
                    raise MigrationError(
                        f"{len(taken)} items' IDs are already other items' in the target {namespace_of(target.config)} "
                        f"(e.g. item {taken[0]}): migrate into a new namespace"
                    )
                target.put_item_sids(chunk)
            report.items_written = len(sids)
        report.seconds["items"] = time.perf_counter() - t0
        log.info(
            "items: %d encoded with %s (%d moved by the collision rule), old table %d (%s)",
            len(cat), tokenizer.version, report.items_reassigned, len(old_items), report.old_tokenizer_versions,
        )  # fmt: skip

        # Step 2: every user stream of the source.
        t0 = time.perf_counter()
        unmapped: Counter[str] = Counter()
        bar = tqdm(total=len(user_ids), unit="user", desc="re-tokenising streams", disable=not progress)
        for start in range(0, len(user_ids), batch_users):
            chunk = user_ids[start : start + batch_users].tolist()
            new_states = []
            for st in source.read_user_states(chunk):
                if st is None:  # a user key without a stream (not written by the stream)
                    continue
                new, lost = migrate_state(st, tmap, tokenizer.n_codes)
                new_states.append(new)
                report.users += 1
                report.events += len(st.stream)
                report.events_mapped += len(new.stream)
                report.users_with_unmapped += bool(lost)
                for u in lost:
                    unmapped[u.reason] += 1
                    if len(report.unmapped_examples) < max_examples:
                        report.unmapped_examples.append({**asdict(u), "old_tokens": list(u.old_tokens)})
                    if on_unmapped is not None:
                        on_unmapped(u)
            if not dry_run and new_states:
                target.write_user_states(new_states)
            bar.update(len(chunk))
        bar.close()
        report.unmapped = dict(unmapped)
        report.seconds["streams"] = time.perf_counter() - t0
        if report.n_unmapped:
            log.warning(
                "%d events could not be mapped (%s): left out, listed in the report", report.n_unmapped, unmapped
            )

        # Step 3: verify against what both namespaces hold now.
        if not dry_run:
            t0 = time.perf_counter()
            check = verify_namespace(
                source, target, tmap, {i: it.tokens for i, it in old_items.items()}, user_ids,
                sample=verify_sample, batch_users=batch_users, feast_store=feast_store, progress=progress, seed=seed,
            )  # fmt: skip
            report.verified = not check.failures
            report.verified_users, report.sampled_users = check.users, check.sampled
            report.feast_checked_users, report.verify_failures = check.feast_users, check.failures[:20]
            report.seconds["verify"] = time.perf_counter() - t0
        report.seconds["total"] = time.perf_counter() - t_all
        return report
