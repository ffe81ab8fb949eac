"""Step 3: the target re-read against the source as it is now."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from features import encoding as enc
from features.store import NamespaceStore, feast_read_streams
from stream.retokenize.items import read_item_table
from stream.retokenize.streams import TokenMap, holders

if TYPE_CHECKING:
    from feast import FeatureStore


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
    return {sid: its[0] for sid, its in holders(items).items() if len(its) == 1}


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
    """Compare every user of the target with the source as it is now (step 3 of the package doc).

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
                    new_items = read_item_table(target, target.entity_ids(enc.ITEM_ID_KEY))
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
