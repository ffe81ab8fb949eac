"""Step 1: the item source as a catalogue, and its collision-free encoding with the new tokenizer."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from features.store import ItemSids, NamespaceStore
from stream import records as rec
from stream.retokenize.plan import TOKENIZER_INPUT, MigrationError

if TYPE_CHECKING:
    from models.tokenizer import FrozenTokenizer

log = logging.getLogger(__name__)


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


def check_catalogue(tokenizer: FrozenTokenizer, cat: ItemCatalogue) -> ItemCatalogue:
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


def read_item_table(store: NamespaceStore, ids: np.ndarray, chunk: int = 5000) -> dict[int, ItemSids]:
    """A namespace's items ``ids`` (read in chunks): the table step 1 inverts and step 3 decodes through."""
    out: dict[int, ItemSids] = {}
    for start in range(0, len(ids), chunk):
        out.update(store.read_item_sids(ids[start : start + chunk].tolist()))
    return out
