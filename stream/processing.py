"""Batch processors behind the stream agents: blocking, synchronous, unit-tested.

An agent hands a batch of raw records to a processor in an executor thread (never in the
event loop) and gets back what to produce. Ordering and at-least-once are the agent's job;
a processor's job is that every record ends as exactly one of: an append (plus its
TrainingSample), an item's semantic IDs, or a DeadLetter with its reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from features.store import AppliedOffset, ItemSids, SidClaim, StreamAction, StreamStore
from features.store.records import USER_DELETED
from hisam_pb.v1 import events_pb2 as pb
from infra.observability import STREAM_ACTIONS_OF_DELETED_USERS, STREAM_DEAD_LETTERS
from stream import records as rec

if TYPE_CHECKING:
    from models.tokenizer import FrozenTokenizer

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class BatchOutput:
    """What one batch produces: (key, value) pairs for the output topics, and counts.

    ``retries``: actions whose item is not known yet, for the retry topic (``UnknownItemRetry``).
    """

    samples: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead_letters: list[tuple[bytes, bytes]] = field(default_factory=list)
    retries: list[tuple[bytes, bytes]] = field(default_factory=list)
    appended: int = 0
    duplicates: int = 0
    items_written: int = 0
    items_moved: int = 0  # items written with an ID other than their natural one (taken, or held from before)
    of_deleted_users: int = 0  # actions dropped: their user was deleted within its grace period
    tombstones: list[tuple[bytes, bytes]] = field(default_factory=list)  # stream/deletions.py


def reject(
    out: BatchOutput, msg: rec.ConsumedRecord, reason: str, detail: str, limits: rec.DeadLetterLimits | None = None
) -> None:
    """Dead-letter one record (bounded by ``limits``), log it and count it by reason."""
    log.warning("dead-lettering %s[%d]@%d: %s: %s", msg.topic, msg.partition, msg.offset, reason, detail[:300])
    STREAM_DEAD_LETTERS.labels(reason=reason).inc()
    d = rec.dead_letter(msg, reason, detail, now_ms(), limits)
    out.dead_letters.append((d.key, d.SerializeToString()))


def batch_applied(batch: Sequence[rec.ConsumedRecord]) -> dict[tuple[str, int], AppliedOffset]:
    """(topic, partition) -> the batch's highest offset and its record's timestamp: what the store
    records as applied with the batch's appends (``StreamStore.append_batch``), and a group
    without committed offsets resumes from (stream/resume.py). Every record of a batch is done
    with once its appends are written: appended, a duplicate, refused, or dead-lettered or
    retried by the same batch."""
    out: dict[tuple[str, int], AppliedOffset] = {}
    for m in batch:
        k = (m.topic, m.partition)
        if k not in out or m.offset > out[k].offset:
            ts = getattr(m, "timestamp", None)  # aiokafka's records have it (ms), RawMessage not
            out[k] = AppliedOffset(m.offset, ts if isinstance(ts, int) and ts >= 0 else -1)
    return out


@dataclass(frozen=True)
class UnknownItemRetry:
    """How long an action whose item has no semantic IDs yet is retried before it is
    dead-lettered as ``unknown_item``: a producer may send an item and an action on it
    together, and the item agent writes the item concurrently with the action agent.

    Such an action goes to the group's retry topic (``stream.topics.action_retries``) in a
    DeadLetter (the original record's coordinates, key and value; ``error_time_ms``: when
    the worker first saw it); the worker's retry agent (``RetryProcessor``) looks its item
    up again ``delay_ms`` after each retry record was produced, and appends it once the
    item is known, or retries again, until ``max_age_ms`` after it was first seen.
    """

    delay_ms: int = 1_000
    max_age_ms: int = 30_000

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.max_age_ms < 0:
            raise ValueError(f"retry delay and age must be non-negative, got {self}")


@dataclass(frozen=True)
class _Pending:
    """A decoded action to append: its original record and when the worker first saw it."""

    msg: rec.ConsumedRecord
    ev: pb.ActionEvent
    first_seen_ms: int


class ActionProcessor:
    """user-actions -> (bounded, idempotent) append to the user's stream + TrainingSample.

    The item's semantic IDs are looked up in the online store; an action on an item the
    store does not know is retried for a while (``UnknownItemRetry``; None: not retried)
    and then dead-lettered (``unknown_item``) rather than appended with made-up tokens. An
    action the store refuses (``AppendResult.refused``: its user's stored state is corrupt)
    is dead-lettered with the store's reason and produces no sample. A duplicate (an event
    id in the user's seen window: a redelivery) is not appended again. While the stream
    still holds it, its sample is produced again from the history before it
    (``AppendResult.resampled``), so a crash after a batch's store write and before its
    samples were acknowledged loses no sample; samples carry the event id and the trainer
    drops repeats. A duplicate older than the stream gets no sample (none can be rebuilt).
    Duplicates are counted (``BatchOutput.duplicates``) and logged, never silent. The store
    records the batch's highest offset per partition with its appends (``batch_applied``);
    a batch none of whose actions reaches the store records nothing.
    """

    def __init__(
        self,
        store: StreamStore,
        limits: rec.DeadLetterLimits | None = None,
        times: rec.EventTimeBounds | None = None,
        retry: UnknownItemRetry | None = None,
    ):
        self.store = store
        self.limits = limits or rec.DeadLetterLimits()
        self.times = times
        self.retry = retry

    def process(self, batch: Sequence[rec.ConsumedRecord], now: int | None = None) -> BatchOutput:
        out = BatchOutput()
        t = now_ms() if now is None else now
        pending: list[_Pending] = []
        for msg in batch:
            try:
                pending.append(_Pending(msg, rec.decode_action(msg.value, self.times, t), t))
            except rec.EventRejected as e:
                reject(out, msg, e.reason, e.detail, self.limits)
        self.append(out, pending, t, batch_applied(batch))
        return out

    def append(
        self,
        out: BatchOutput,
        pending: Sequence[_Pending],
        now: int,
        applied: Mapping[tuple[str, int], AppliedOffset] | None = None,
    ) -> None:
        """Append decoded actions (in order) into ``out``; unknown items are retried or dead-lettered.

        ``applied``: the source offsets the store records with the appends (``batch_applied``).
        """
        if not pending:
            return
        items = self.store.read_item_sids(sorted({p.ev.item_id for p in pending}))
        known = []
        for p in pending:
            it = items.get(p.ev.item_id)
            if it is not None:
                known.append((p, it))
            elif self.retry is not None and now - p.first_seen_ms < self.retry.max_age_ms:
                out.retries.append(retry_record(p, self.limits))
            else:
                waited = f" after {(now - p.first_seen_ms) / 1000:.1f}s of retries" if now > p.first_seen_ms else ""
                reject(
                    out, p.msg, rec.UNKNOWN_ITEM,
                    f"item {p.ev.item_id} has no semantic IDs in the online store{waited}", self.limits,
                )  # fmt: skip
        if not known:
            return
        actions = [
            StreamAction(
                user_id=p.ev.user_id,
                event_id=p.ev.event_id,
                item_id=p.ev.item_id,
                action=p.ev.action,
                event_time_ms=p.ev.event_time_ms,
                item_tokens=it.tokens,
            )
            for p, it in known
        ]
        try:
            results = self.store.append_batch(actions, applied=applied)
        except ValueError:
            # One invalid action (e.g. an item stored with the wrong token count) must not
            # block the partition: retry one by one and dead-letter only the bad ones.
            results = []
            for (p, _), a in zip(known, actions):
                try:
                    results.append(self.store.append(a))
                except ValueError as e:
                    results.append(None)
                    reject(out, p.msg, rec.INVALID_FIELD, str(e), self.limits)
            if applied:
                self.store.append_batch([], applied=applied)  # after the appends: never ahead of them
        for (p, it), res in zip(known, results):
            if res is None:
                continue
            if res.refused == USER_DELETED:  # dropped, not dead-lettered: the log keeps no copy of it
                out.of_deleted_users += 1
                STREAM_ACTIONS_OF_DELETED_USERS.inc()
                continue
            if res.refused:
                reject(out, p.msg, res.refused, res.detail or "refused by the online store", self.limits)
                continue
            if res.duplicate:
                out.duplicates += 1
                if not res.resampled:
                    continue
            else:
                out.appended += 1
            sample = rec.training_sample_bytes(
                p.ev, res.history_tokens_packed, res.history_actions_packed, it.tokens, it.tokenizer_version
            )
            out.samples.append((rec.user_key(p.ev.user_id), sample))
        if out.duplicates:
            log.info("%d redelivered actions were already appended: not appended again", out.duplicates)
        if out.of_deleted_users:
            log.info("%d actions of deleted users dropped (their grace period)", out.of_deleted_users)


def retry_record(p: _Pending, limits: rec.DeadLetterLimits) -> tuple[bytes, bytes]:
    """The retry topic's record of an action whose item is unknown: keyed by its user (one
    user's retries stay in order), its value the original record in a DeadLetter envelope.

    The envelope keeps the original value when it is within the dead-letter value limit,
    else the decoded action without unknown fields (what is appended is the same), so a
    retry record is always bounded.
    """
    raw = p.msg.value or b""
    if len(raw) > limits.value_bytes:
        ev = pb.ActionEvent()
        ev.CopyFrom(p.ev)
        ev.DiscardUnknownFields()
        raw = ev.SerializeToString()
    env = pb.DeadLetter(
        topic=p.msg.topic,
        partition=p.msg.partition,
        offset=p.msg.offset,
        key=(p.msg.key or b"")[: limits.key_bytes],
        raw=raw,
        reason=rec.UNKNOWN_ITEM,
        detail=f"item {p.ev.item_id} has no semantic IDs yet",
        error_time_ms=p.first_seen_ms,
    )
    return rec.user_key(p.ev.user_id), env.SerializeToString()


class RetryProcessor:
    """The retry topic -> ``ActionProcessor.append`` once each record is due.

    A record is due ``retry.delay_ms`` after it was produced (its Kafka timestamp); the
    processor sleeps (in its own thread) until the batch's last record is due: at most the
    delay. Each action is then appended if its item is now known, retried again while it is
    younger than ``retry.max_age_ms``, else dead-lettered as ``unknown_item`` with its
    original record's coordinates. A record that is not a retry envelope is dead-lettered
    as ``decode_error``. The store records the retry topic's own offsets (under its name,
    ``batch_applied``) with the appends, never user-actions': a retry record's original
    offset lies behind what its partition's later batches recorded already.
    """

    def __init__(self, actions: ActionProcessor, sleep=time.sleep, clock=now_ms):
        if actions.retry is None:
            raise ValueError("a RetryProcessor needs an ActionProcessor with an UnknownItemRetry")
        self.actions = actions
        self.retry: UnknownItemRetry = actions.retry
        self.sleep, self.clock = sleep, clock

    def process(self, batch: Sequence[rec.ConsumedRecord]) -> BatchOutput:
        out = BatchOutput()
        pending: list[_Pending] = []
        due = 0
        for msg in batch:
            try:
                env = rec.parse_message(pb.DeadLetter, msg.value)
                orig = rec.RawMessage(env.topic, env.partition, env.offset, env.key, env.raw)
                pending.append(_Pending(orig, rec.decode_action(env.raw), env.error_time_ms))
            except rec.EventRejected as e:
                reject(out, msg, e.reason, f"not a retry record: {e.detail}", self.actions.limits)
                continue
            produced = getattr(msg, "timestamp", None) or env.error_time_ms
            due = max(due, produced + self.retry.delay_ms)
        wait_s = min(due - self.clock(), self.retry.delay_ms) / 1000.0
        if pending and wait_s > 0:
            self.sleep(wait_s)
        self.actions.append(out, pending, self.clock(), batch_applied(batch))
        return out


class ItemProcessor:
    """item-events -> frozen tokenizer -> a unique semantic ID -> the online store.

    Written directly in Feast's layout, so the item is rankable as soon as this returns.
    Items are encoded as one batch; should the tokenizer still refuse the batch, items are
    encoded one by one so that only the offending ones are dead-lettered.

    Two items never share one full ID (docs/method.md, codebook hygiene): each item claims its
    ID in the store's index (``StreamStore.claim_item_sids``, atomic across workers), its
    natural ID first, else the nearest free last code by the last codebook's distances,
    the rule of ``models.tokenizer.collisions`` applied in arrival order. An item keeps
    the ID it got first, also when sent again with other features (users' streams store
    IDs: see ``claim_item_sids``); a new tokenizer version re-assigns them all.
    """

    def __init__(self, store: StreamStore, tokenizer: FrozenTokenizer, limits: rec.DeadLetterLimits | None = None):
        self.store = store
        self.tokenizer = tokenizer
        self.limits = limits or rec.DeadLetterLimits()
        if tokenizer.n_codes != store.config.n_codes:
            raise ValueError(
                f"tokenizer emits {tokenizer.n_codes} codes, the online store keeps {store.config.n_codes}"
            )

    def process(self, batch: Sequence[rec.ConsumedRecord]) -> BatchOutput:
        from models.tokenizer import TokenizerInputError

        out = BatchOutput()
        good: list[tuple[rec.ConsumedRecord, rec.ItemFeatures]] = []
        for msg in batch:
            try:
                good.append((msg, rec.decode_item(msg.value, self.tokenizer.modalities)))
            except rec.EventRejected as e:
                reject(out, msg, e.reason, e.detail, self.limits)
        if not good:
            return out
        try:
            codes, dist = self._encode_batch([f for _, f in good])
            encoded = [(g, codes[i], dist[i]) for i, g in enumerate(good)]
        except TokenizerInputError:
            encoded = []
            for msg, f in good:
                try:
                    c, d = self.tokenizer.encode_codes(f.features, None, batched=False)
                    encoded.append(((msg, f), c[0], d[0]))
                except TokenizerInputError as e:
                    reject(out, msg, rec.TOKENIZER_INPUT, str(e), self.limits)
        if not encoded:
            return out
        claims = [self._claim(f.event.item_id, c, d) for (_, f), c, d in encoded]
        sids = []
        for ((msg, f), _, _), claim, tokens in zip(encoded, claims, self.store.claim_item_sids(claims)):
            if tokens is None:
                reject(
                    out, msg, rec.SID_SPACE_FULL, f"every ID with the prefix {claim.prefix} is another item's",
                    self.limits,
                )  # fmt: skip
                continue
            out.items_moved += tokens != claim.candidate(0)  # candidate 0: the natural ID
            sids.append(ItemSids(f.event.item_id, tokens, self.tokenizer.version, f.event.event_time_ms))
        if sids:
            self.store.put_item_sids(sids)
        out.items_written = len(sids)
        if out.items_moved:
            log.info(
                "%d items hold an ID other than their natural one (another item's, or theirs from before)",
                out.items_moved,
            )
        return out

    def _claim(self, item_id: int, codes: np.ndarray, last_dist: np.ndarray) -> SidClaim:
        """The item's candidate IDs: its natural one, then each other last code by distance."""
        tokens = self.tokenizer.to_tokens(codes)  # (L,) global token ids
        natural = int(codes[-1])
        order = [natural, *(int(k) for k in np.argsort(last_dist, kind="stable") if k != natural)]
        offset = int(self.tokenizer.token_offsets[-1])
        return SidClaim(int(item_id), tuple(int(t) for t in tokens[:-1]), tuple(offset + k for k in order))

    def _encode_batch(self, items: Sequence[rec.ItemFeatures]) -> tuple[np.ndarray, np.ndarray]:
        """Local codes (B, L) and last-layer distances (B, K) of a batch of items."""
        mods = self.tokenizer.modalities
        n = len(items)
        feats = {m: np.zeros((n, w), np.float32) for m, w in mods.items()}  # (B, D_m)
        present = {m: np.zeros(n, bool) for m in mods}
        for i, it in enumerate(items):
            for m, v in it.features.items():
                feats[m][i] = v
                present[m][i] = True
        return self.tokenizer.encode_codes(feats, present, batched=True)
