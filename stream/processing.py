"""Batch processors behind the stream agents: blocking, synchronous, unit-tested.

An agent hands a batch of raw records to a processor in an executor thread (never in the
event loop) and gets back what to produce. Ordering and at-least-once are the agent's job;
a processor's job is that every record ends as exactly one of: an append (plus its
TrainingSample), an item's semantic IDs, or a DeadLetter with its reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from features.store import ItemSids, SidClaim, StreamAction, StreamStore
from infra.observability import STREAM_DEAD_LETTERS
from stream import records as rec

if TYPE_CHECKING:
    from models.tokenizer import FrozenTokenizer

log = logging.getLogger(__name__)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class BatchOutput:
    """What one batch produces: (key, value) pairs for the output topics, and counts."""

    samples: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead_letters: list[tuple[bytes, bytes]] = field(default_factory=list)
    appended: int = 0
    duplicates: int = 0
    items_written: int = 0
    items_moved: int = 0  # items written with an ID other than their natural one (taken, or held from before)


class ActionProcessor:
    """user-actions -> (bounded, idempotent) append to the user's stream + TrainingSample.

    The item's semantic IDs are looked up in the online store; an action on an item the
    store does not know is dead-lettered (``unknown_item``) rather than appended with
    made-up tokens. A duplicate (an event id in the user's seen window: a redelivery) is
    not appended again. While the stream still holds it, its sample is produced again
    from the history before it (``AppendResult.resampled``), so a crash after a batch's
    store write and before its samples were acknowledged loses no sample; samples carry
    the event id and the trainer drops repeats. A duplicate older than the stream gets no
    sample (none can be rebuilt). Duplicates are counted (``BatchOutput.duplicates``) and
    logged, never silent.
    """

    def __init__(self, store: StreamStore):
        self.store = store

    def process(self, batch: Sequence[rec.ConsumedRecord]) -> BatchOutput:
        out = BatchOutput()
        events: list[tuple[rec.ConsumedRecord, object]] = []
        for msg in batch:
            try:
                events.append((msg, rec.decode_action(msg.value)))
            except rec.EventRejected as e:
                self._reject(out, msg, e.reason, e.detail)
        if not events:
            return out
        items = self.store.read_item_sids(sorted({ev.item_id for _, ev in events}))
        known = []
        for msg, ev in events:
            it = items.get(ev.item_id)
            if it is None:
                self._reject(out, msg, rec.UNKNOWN_ITEM, f"item {ev.item_id} has no semantic IDs in the online store")
            else:
                known.append((msg, ev, it))
        actions = [
            StreamAction(
                user_id=ev.user_id,
                event_id=ev.event_id,
                item_id=ev.item_id,
                action=ev.action,
                event_time_ms=ev.event_time_ms,
                item_tokens=it.tokens,
            )
            for _, ev, it in known
        ]
        try:
            results = self.store.append_batch(actions)
        except ValueError:
            # One invalid action (e.g. an item stored with the wrong token count) must not
            # block the partition: retry one by one and dead-letter only the bad ones.
            results = []
            for (msg, _, _), a in zip(known, actions):
                try:
                    results.append(self.store.append(a))
                except ValueError as e:
                    results.append(None)
                    self._reject(out, msg, rec.INVALID_FIELD, str(e))
        for (msg, ev, it), res in zip(known, results):
            if res is None:
                continue
            if res.duplicate:
                out.duplicates += 1
                if not res.resampled:
                    continue
            else:
                out.appended += 1
            sample = rec.training_sample_bytes(
                ev, res.history_tokens_packed, res.history_actions_packed, it.tokens, it.tokenizer_version
            )
            out.samples.append((rec.user_key(ev.user_id), sample))
        if out.duplicates:
            log.info("%d redelivered actions were already appended: not appended again", out.duplicates)
        return out

    @staticmethod
    def _reject(out: BatchOutput, msg: rec.ConsumedRecord, reason: str, detail: str) -> None:
        log.warning("dead-lettering %s[%d]@%d: %s: %s", msg.topic, msg.partition, msg.offset, reason, detail)
        STREAM_DEAD_LETTERS.labels(reason=reason).inc()
        out.dead_letters.append((msg.key or b"", rec.dead_letter(msg, reason, detail, now_ms()).SerializeToString()))


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

    def __init__(self, store: StreamStore, tokenizer: FrozenTokenizer):
        self.store = store
        self.tokenizer = tokenizer
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
                ActionProcessor._reject(out, msg, e.reason, e.detail)
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
                    ActionProcessor._reject(out, msg, rec.TOKENIZER_INPUT, str(e))
        if not encoded:
            return out
        claims = [self._claim(f.event.item_id, c, d) for (_, f), c, d in encoded]
        sids = []
        for ((msg, f), _, _), claim, tokens in zip(encoded, claims, self.store.claim_item_sids(claims)):
            if tokens is None:
                ActionProcessor._reject(
                    out, msg, rec.SID_SPACE_FULL, f"every ID with the prefix {claim.prefix} is another item's"
                )
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
