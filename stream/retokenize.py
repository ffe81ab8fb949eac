"""Controlled re-tokenisation: copy a namespace's items and user streams to a new tokenizer version.

docs/method.md §1 "Lifecycle": the tokenizer is frozen while the ranker trains, and a new
tokenizer version (monthly) triggers a re-tokenisation of items and streams. A user
stream stores per item only its semantic-ID tokens (no item id), so the old tokens are
turned back into item ids through the *old* namespace's item table (``item_sid``: every
ingested item's SIDs), and the items are re-encoded with the new frozen tokenizer:

    old tokens --(old item table, inverted)--> item id --(new tokenizer)--> new tokens

Blue/green: everything is written into a separate namespace (another Feast project, i.e.
another Redis key suffix or SQLite table prefix, and its own feature repo); the source
namespace is only read, so serving keeps reading it until the cut-over. Steps:

1. items: encode every item of the item source (the item-events topic or a dataset) with
   the new tokenizer, under the collision rule of ``models.tokenizer.collisions`` in item-id
   order (the new item table is collision-free, so the *next* migration can invert it),
   and write SIDs + tokenizer version into the target;
2. streams: for every user of the source, map each item's tokens (``TokenMap``) and write
   the whole user state (stream, seen window, profile counters) into the target. An event
   whose tokens cannot be mapped (``UNKNOWN_SID``: no item of the old table has them, e.g.
   an item re-ingested with new features since; ``ITEM_NOT_IN_SOURCE``: the item source
   has no usable event for the item; ``AMBIGUOUS_SID``: several old items share them and
   re-encode differently) is left out of the new stream, reported and counted; its event
   id stays in the seen window, so a redelivery of it is still a duplicate;
3. verify: source and target re-read; per user the target holds exactly the source's
   events less the unmapped ones, in order, with the same actions, times, seen window and
   counters; for a sample of users, both streams decode to the same item ids through
   their own item tables (the target's read back from the store); optionally the sample
   read through Feast equals the direct read. A source that changed since step 2 (a
   stream worker still running) fails this check.

The command around it (the stop / migrate / restart procedure) is ``hisam tokenizer
migrate`` (hisam/jobs/tokenizer_migrate.py). Letters: N items, L tokens per item, E events.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from features import encoding as enc
from features.store import (
    ItemSids,
    NamespaceStore,
    OnlineStoreConfig,
    SidClaim,
    UserState,
    UserStream,
    feast_read_streams,
)
from stream import records as rec

if TYPE_CHECKING:
    from feast import FeatureStore

    from models.tokenizer import FrozenTokenizer

log = logging.getLogger(__name__)

# Why an event's tokens could not be mapped (stable strings: the report keys on them).
UNKNOWN_SID = "unknown_sid"
ITEM_NOT_IN_SOURCE = "item_not_in_source"
AMBIGUOUS_SID = "ambiguous_sid"
# Why an item of the item source was not encoded.
TOKENIZER_INPUT = rec.TOKENIZER_INPUT


class MigrationError(ValueError):
    """Bad input to a migration (namespaces, tokenizer, item source): nothing was written."""


# ---- namespaces ------------------------------------------------------------------------


def namespace_of(config: OnlineStoreConfig) -> str:
    """Where a namespace lives, as one comparable string (backend, location, project)."""
    if config.backend == "sqlite":
        return f"sqlite:{config.sqlite_db.resolve()}#{config.project}"
    u = urlparse(config.redis_url)
    db = (u.path or "/0").lstrip("/") or "0"
    return f"redis://{u.hostname or '127.0.0.1'}:{u.port or 6379}/{db}#{config.project}"


def default_project(tokenizer_version: str) -> str:
    """The target project for a tokenizer version: ``hisam_dst_0123abcd4567`` (an identifier)."""
    name = "hisam_" + "".join(c if c.isalnum() else "_" for c in tokenizer_version)
    if not name.isidentifier():
        raise MigrationError(f"tokenizer version {tokenizer_version!r} gives no valid project name")
    return name


def check_namespaces(source: OnlineStoreConfig, target: OnlineStoreConfig, tokenizer: FrozenTokenizer) -> None:
    """Refuse a migration that would write in place, lose events or mix code lengths."""
    if namespace_of(source) == namespace_of(target):
        raise MigrationError(
            f"source and target are the same namespace ({namespace_of(source)}): a migration never writes "
            "in place; give the target another project (--to-project) or store"
        )
    if Path(source.repo_dir).resolve() == Path(target.repo_dir).resolve():
        raise MigrationError(
            f"source and target share the feature repo {source.repo_dir}: its feature_store.yaml names one "
            "project, so the target needs its own (--to-repo-dir)"
        )
    if target.n_codes != tokenizer.n_codes:
        raise MigrationError(
            f"the new tokenizer {tokenizer.version} emits {tokenizer.n_codes} codes per item, "
            f"the target store is configured for {target.n_codes}"
        )
    if target.stream_len < source.stream_len or target.seen_window < source.seen_window:
        raise MigrationError(
            f"the target keeps T={target.stream_len}, W={target.seen_window}, less than the source's "
            f"T={source.stream_len}, W={source.seen_window}: events or seen ids would be lost"
        )


# ---- step 1: items -----------------------------------------------------------------------


@dataclass
class ItemCatalogue:
    """The items to re-encode: their modalities, as the item source holds them last.

    ``item_ids`` sorted and unique; ``features[m]`` (N, D_m) float32 with zero rows where
    ``present[m]`` is False; ``rejected`` counts source records left out, by reason.
    """

    item_ids: np.ndarray  # (N,) int64
    features: dict[str, np.ndarray]  # modality -> (N, D_m)
    present: dict[str, np.ndarray]  # modality -> (N,) bool
    event_time_ms: np.ndarray  # (N,) int64
    rejected: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.item_ids)


def catalogue_from_item_events(values: Iterable[bytes | None], modalities: Mapping[str, int]) -> ItemCatalogue:
    """Item events (raw ItemEvent bytes, in topic order) -> the last valid event of each item.

    Validated as the stream validates them for the new tokenizer (``records.decode_item``);
    an invalid event is counted and skipped, so an item keeps its last valid modalities, as
    an ingesting worker would leave it.
    """
    last: dict[int, rec.ItemFeatures] = {}
    rejected: Counter[str] = Counter()
    for raw in values:
        try:
            f = rec.decode_item(raw, modalities)
        except rec.EventRejected as e:
            rejected[e.reason] += 1
            continue
        last[f.event.item_id] = f
    ids = np.asarray(sorted(last), np.int64)
    feats = {m: np.zeros((len(ids), w), np.float32) for m, w in modalities.items()}
    present = {m: np.zeros(len(ids), bool) for m in modalities}
    times = np.zeros(len(ids), np.int64)
    for row, i in enumerate(ids.tolist()):
        f = last[i]
        times[row] = f.event.event_time_ms
        for m, v in f.features.items():
            feats[m][row] = v
            present[m][row] = True
    return ItemCatalogue(ids, feats, present, times, dict(rejected))


def catalogue_from_dataset(items, event_time_ms: int) -> ItemCatalogue:
    """A dataset's ``ItemTable`` (item id = row, as ``hisam events produce`` numbers them)."""
    return ItemCatalogue(
        item_ids=np.asarray(items.ids, np.int64),
        features={m: np.asarray(x, np.float32) for m, x in items.features.items()},
        present={m: np.asarray(p, bool) for m, p in items.present.items()},
        event_time_ms=np.full(len(items.ids), int(event_time_ms), np.int64),
    )


def _check_modalities(tokenizer: FrozenTokenizer, cat: ItemCatalogue) -> None:
    if set(cat.features) != set(tokenizer.modalities) or set(cat.present) != set(tokenizer.modalities):
        raise MigrationError(
            f"the item source has modalities {sorted(cat.features)}, the new tokenizer takes {sorted(tokenizer.modalities)}"
        )
    for m, w in tokenizer.modalities.items():
        if cat.features[m].shape != (len(cat), w) or cat.present[m].shape != (len(cat),):
            raise MigrationError(f"modality {m!r}: items have shape {cat.features[m].shape}, the tokenizer takes {w}")


def _check_catalogue(tokenizer: FrozenTokenizer, cat: ItemCatalogue) -> ItemCatalogue:
    """Drop the rows the tokenizer would refuse (counted), so one bad item cannot stop the batch."""
    _check_modalities(tokenizer, cat)
    pres = np.stack([cat.present[m] for m in tokenizer.modalities], 1)  # (N, M)
    ok = pres.all(1) if not tokenizer.imputes_missing else pres.any(1)
    for m in tokenizer.modalities:
        ok &= np.isfinite(cat.features[m]).all(1) | ~cat.present[m]
    if ok.all():
        return cat
    log.warning("%d items the new tokenizer cannot encode are left out", int((~ok).sum()))
    rejected = dict(cat.rejected)
    rejected[TOKENIZER_INPUT] = rejected.get(TOKENIZER_INPUT, 0) + int((~ok).sum())
    return ItemCatalogue(
        cat.item_ids[ok],
        {m: x[ok] for m, x in cat.features.items()},
        {m: p[ok] for m, p in cat.present.items()},
        cat.event_time_ms[ok],
        rejected,
    )


def encode_catalogue(
    tokenizer: FrozenTokenizer, cat: ItemCatalogue, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) collision-free global tokens and the (N,) mask of items whose last code moved.

    The same result as ``tokenizer.encode_batch(all features, taken=[])`` in item-id order,
    in bounded memory: natural codes batch by batch, then the last-layer distances only
    for the later duplicates (``resolve_collisions`` needs no more).
    """
    from models.tokenizer import resolve_collisions

    _check_modalities(tokenizer, cat)

    def codes_of(rows: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        return tokenizer.encode_codes(
            {m: x[rows] for m, x in cat.features.items()}, {m: p[rows] for m, p in cat.present.items()}, batched=True
        )

    n = len(cat)
    codes = np.empty((n, tokenizer.n_codes), np.int64)  # (N, L) local codes
    for start in range(0, n, batch_size):
        codes[start : start + batch_size] = codes_of(slice(start, start + batch_size))[0]
    keep = np.zeros(n, bool)
    if n:
        keep[np.unique(codes, axis=0, return_index=True)[1]] = True  # first holder of each ID keeps it
    pending = np.flatnonzero(~keep)
    if pending.size:
        _, dist = codes_of(pending)  # (P, K)
        codes[pending], _ = resolve_collisions(codes[pending], dist, taken=map(tuple, codes[keep].tolist()))
    return tokenizer.to_tokens(codes), ~keep


# ---- step 2: streams ---------------------------------------------------------------------


@dataclass
class TokenMap:
    """Old SIDs -> new SIDs, built from the old item table and the new encoding."""

    new_of: dict[tuple[int, ...], tuple[int, ...]]
    unmappable: dict[tuple[int, ...], str]  # old SIDs of known items that cannot be mapped -> reason

    def lookup(self, old: tuple[int, ...]) -> tuple[int, ...] | str:
        """The new SIDs, or the reason (a string) why there are none."""
        got = self.new_of.get(old)
        if got is not None:
            return got
        return self.unmappable.get(old, UNKNOWN_SID)


def _holders(items: Mapping[int, Sequence[int]]) -> dict[tuple[int, ...], list[int]]:
    """An item table inverted: each SID -> the ids of the items that hold it, in table order."""
    holders: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, t in items.items():
        holders[tuple(int(x) for x in t)].append(int(i))
    return holders


def build_token_map(old_items: Mapping[int, Sequence[int]], new_items: Mapping[int, Sequence[int]]) -> TokenMap:
    """Invert the old item table (SIDs -> item ids) and compose with the new one.

    Old SIDs held by several items (the live ingestion path does not resolve collisions)
    still map when every holder re-encodes to the same new SIDs; otherwise they are
    ambiguous: nothing in the stream tells which item the event was.
    """
    new_of, unmappable = {}, {}
    for sid, items in _holders(old_items).items():
        targets = {tuple(int(x) for x in new_items[i]) for i in items if i in new_items}
        missing = any(i not in new_items for i in items)
        if len(targets) == 1 and not missing:
            new_of[sid] = targets.pop()
        else:
            unmappable[sid] = ITEM_NOT_IN_SOURCE if len(items) == 1 else AMBIGUOUS_SID
    return TokenMap(new_of, unmappable)


@dataclass(frozen=True)
class UnmappedEvent:
    """An event left out of the new stream (its id stays in the seen window)."""

    user_id: int
    event_id: str
    event_time_ms: int
    action: int
    old_tokens: tuple[int, ...]
    reason: str


def migrate_state(state: UserState, tmap: TokenMap, n_codes: int) -> tuple[UserState, list[UnmappedEvent]]:
    """One user's state with every item's tokens mapped; the unmapped events left out and returned."""
    s = state.stream
    keep, rows, unmapped = [], [], []
    for k, row in enumerate(s.tokens.tolist()):
        old = tuple(row)
        got = tmap.lookup(old)
        if isinstance(got, str):
            unmapped.append(
                UnmappedEvent(s.user_id, s.event_ids[k], int(s.event_times_ms[k]), int(s.actions[k]), old, got)
            )
        else:
            keep.append(k)
            rows.append(got)
    idx = np.asarray(keep, np.int64)
    new = UserStream(
        user_id=s.user_id,
        tokens=np.asarray(rows, np.int64).reshape(len(keep), n_codes),  # (E', L)
        actions=s.actions[idx],
        event_ids=[s.event_ids[k] for k in keep],
        event_times_ms=s.event_times_ms[idx],
    )
    return UserState(new, list(state.seen_ids), state.n_actions, state.last_action_ms), unmapped


# ---- the report ------------------------------------------------------------------------------


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


# ---- the migration ---------------------------------------------------------------------------


def _read_items(store: NamespaceStore, ids: np.ndarray, chunk: int = 5000) -> dict[int, ItemSids]:
    out: dict[int, ItemSids] = {}
    for start in range(0, len(ids), chunk):
        out.update(store.read_item_sids(ids[start : start + chunk].tolist()))
    return out


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
    """Steps 1-3 of the module doc; returns the report (``verified`` False on any mismatch).

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
            from features.store import open_stream_store

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
        old_items = _read_items(source, source.entity_ids(enc.ITEM_ID_KEY))
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
        cat = _check_catalogue(tokenizer, catalogue)
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


@dataclass
class VerifyResult:
    users: int = 0
    sampled: int = 0
    feast_users: int = 0
    failures: list[str] = field(default_factory=list)


def _decode(tokens: np.ndarray, inverse: Mapping[tuple[int, ...], int]) -> list[int | None]:
    return [inverse.get(tuple(row)) for row in tokens.tolist()]


def _unique_inverse(items: Mapping[int, Sequence[int]]) -> dict[tuple[int, ...], int]:
    """SIDs -> item id, for the SIDs exactly one item holds."""
    return {sid: its[0] for sid, its in _holders(items).items() if len(its) == 1}


def verify_namespace(
    source: NamespaceStore,
    target: NamespaceStore,
    tmap: TokenMap,
    old_items: Mapping[int, Sequence[int]],
    user_ids: np.ndarray,
    *,
    sample: int = 1000,
    batch_users: int = 500,
    feast_store: FeatureStore | None = None,
    progress: bool = False,
    seed: int = 0,
) -> VerifyResult:
    """Compare every user of the target with the source as it is now (step 3 of the module doc).

    Per user: the target's event ids are the source's less exactly the unmapped ones, in
    order, with equal actions and times, and the seen window and counters are equal. For
    ``sample`` users (seeded choice) both streams are decoded to item ids, each through its
    own namespace's item table (the target's read back from the target), and must agree.
    """
    res = VerifyResult()
    rng = np.random.default_rng(seed)
    size = min(sample, len(user_ids))
    sampled = set(rng.choice(user_ids, size=size, replace=False).tolist()) if size else set()
    old_inverse = _unique_inverse(old_items)
    new_inverse: dict[tuple[int, ...], int] | None = None
    feast_users: list[int] = []

    def fail(msg: str) -> None:
        res.failures.append(msg)

    bar = tqdm(total=len(user_ids), unit="user", desc="verifying", disable=not progress)
    for start in range(0, len(user_ids), batch_users):
        chunk = user_ids[start : start + batch_users].tolist()
        for u, old, new in zip(chunk, source.read_user_states(chunk), target.read_user_states(chunk)):
            if old is None:
                if new is not None:
                    fail(f"user {u}: a stream in the target, none in the source")
                continue
            if new is None:
                fail(f"user {u}: no stream in the target")
                continue
            res.users += 1
            o, n = old.stream, new.stream
            mapped = [not isinstance(tmap.lookup(tuple(r)), str) for r in o.tokens.tolist()]
            kept = [k for k, ok in enumerate(mapped) if ok]
            if n.event_ids != [o.event_ids[k] for k in kept]:
                fail(f"user {u}: target events {len(n)} != source {len(o)} less {len(o) - len(kept)} unmapped")
                continue
            if not (
                np.array_equal(n.actions, o.actions[kept]) and np.array_equal(n.event_times_ms, o.event_times_ms[kept])
            ):
                fail(f"user {u}: actions or event times differ")
            if new.seen_ids != old.seen_ids:
                fail(f"user {u}: seen window differs ({len(new.seen_ids)} vs {len(old.seen_ids)} ids)")
            if (new.n_actions, new.last_action_ms) != (old.n_actions, old.last_action_ms):
                fail(
                    f"user {u}: counters differ ({new.n_actions}, {new.last_action_ms}) vs ({old.n_actions}, {old.last_action_ms})"
                )
            if u in sampled:
                if new_inverse is None:
                    new_items = _read_items(target, target.entity_ids(enc.ITEM_ID_KEY))
                    new_inverse = _unique_inverse({i: it.tokens for i, it in new_items.items()})
                res.sampled += 1
                decoded = _decode(o.tokens, old_inverse)
                before = [decoded[k] for k in kept]
                after = _decode(n.tokens, new_inverse)
                if before != after or None in after:
                    fail(f"user {u}: items decode differently ({before[:5]}... vs {after[:5]}...)")
                feast_users.append(u)
        bar.update(len(chunk))
    bar.close()
    if feast_store is not None and feast_users:
        for start in range(0, len(feast_users), batch_users):
            chunk = feast_users[start : start + batch_users]
            direct = target.read_streams(chunk)
            via = feast_read_streams(feast_store, chunk, target.config.n_codes)
            for u, d, f in zip(chunk, direct, via):
                res.feast_users += 1
                if f is None or f.event_ids != d.event_ids or not np.array_equal(f.tokens, d.tokens):
                    fail(f"user {u}: Feast's read of the target differs from the direct read")
    return res
