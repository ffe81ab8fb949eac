"""Step 2: old semantic IDs to new ones, and a user's state with every item's tokens mapped."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from features.store import UserState, UserStream
from stream.retokenize.plan import AMBIGUOUS_SID, ITEM_NOT_IN_SOURCE, UNKNOWN_SID


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


def holders(items: Mapping[int, Sequence[int]]) -> dict[tuple[int, ...], list[int]]:
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
    for sid, items in holders(old_items).items():
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
