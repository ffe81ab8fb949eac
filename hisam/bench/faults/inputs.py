"""The traffic of the fault bench: valid actions, and hostile records generated from valid ones.

Everything comes from one seeded ``numpy.random.Generator`` (hypothesis is not a dependency
of the project), so a run is reproducible from ``--seed``. Each record knows its kind and the
outcomes that are acceptable for it (``Record.expect``): a dead-letter reason, ``APPENDED``
(it must end up in its user's stream exactly once) or ``IGNORED`` (a redelivery: nothing
must change). The checks (``checks``) match dead letters to records by the SHA-256 of the
record's value, which every DeadLetter carries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError

from hisam_pb.v1 import events_pb2 as pb
from stream import records as rec
from stream import topics as tp

APPENDED = "appended"
IGNORED = "ignored"  # a redelivered event id: no dead letter, no second append
VALID = "valid"
# A valid item event is stored, or refused as sid_space_full: every ID the collision rule may
# give it is taken (the tiny tokenizer's 16-code last codebook fills up on similar items).
ITEM_STORED = frozenset({APPENDED, rec.SID_SPACE_FULL})

# Dead-letter reasons a record may get, by what it is (stream/records.py).
ANY_ACTION_REFUSAL = frozenset({rec.DECODE_ERROR, rec.INVALID_FIELD})
ANY_ITEM_REFUSAL = frozenset(
    {rec.DECODE_ERROR, rec.INVALID_FIELD, rec.NO_EMBEDDING, rec.UNKNOWN_MODALITY, rec.WRONG_WIDTH}
)

# Hostile kinds on the topics, with their share of --inputs (the rest go to Rank, see rank.py).
STREAM_KINDS: dict[str, float] = {
    "truncated": 9,
    "random_bytes": 9,
    "oversized": 1,
    "wrong_type": 6,
    "non_finite_embedding": 6,
    "huge_ids": 5,
    "negative_ids": 5,
    "long_event_id": 6,
    "non_utf8_event_id": 6,
    "duplicate_event_id": 10,
    "future_event_time": 6,
    "corrupt_user_state": 3,
    "action_before_item": 4,
}
# The fewest inputs of a kind: one of each variant its generator cycles through (k % n), and
# four corrupted users (one per corruption, services.CORRUPTIONS) with three actions each.
MIN_PER_KIND: dict[str, int] = {
    "truncated": 3, "random_bytes": 7, "oversized": 3, "wrong_type": 5, "non_finite_embedding": 3, "huge_ids": 3,
    "negative_ids": 3, "long_event_id": 2, "non_utf8_event_id": 4, "duplicate_event_id": 3,
    "future_event_time": 4, "corrupt_user_state": 12, "action_before_item": 2,
}  # fmt: skip
MAX_OVERSIZED = 8  # 1-2 MB each: the embedded broker rewrites what it holds every second
OVERSIZED_BYTES = (1_000_000, 2_000_000)
I64_MAX = 2**63 - 1
HOUR_MS = 3_600_000
NAN_ITEMS = 40  # new item ids 1..40 get poisoned item events; the last ones are popped for early actions


@dataclass
class Record:
    """One record to produce, what it is, and what may become of it."""

    topic: str
    key: bytes | None
    value: bytes | None
    kind: str  # VALID or a hostile kind
    expect: frozenset[str]
    user: int | None = None
    event_id: str | None = None
    note: str = ""  # the variant, for the report of an unexpected outcome
    follow: list[Record] = field(default_factory=list)  # sent right after this one (an item after its action)


@dataclass
class Plan:
    """Two phases of traffic; between them the bench corrupts ``corrupt_users``' stored state."""

    phase1: list[Record]
    phase2: list[Record]
    corrupt_users: list[int]
    valid_users: list[int]
    counts: dict[str, int]  # hostile inputs per kind

    def records(self) -> Iterable[Record]:
        for r in self.phase1 + self.phase2:
            yield r
            yield from r.follow


def action_bytes(event_id: str, user: int, item: int, action: int, t_ms: int) -> bytes:
    return rec.action_event(event_id, user, item, action, t_ms).SerializeToString()


def _raw_action(event_id: bytes, user: int, item: int, action: int, t_ms: int) -> bytes:
    """ActionEvent bytes written by hand: an event id that protobuf would not build (non-UTF-8)."""
    from features.encoding import varint

    def vfield(tag: int, v: int) -> bytes:
        return varint(tag << 3) + varint(v & (2**64 - 1))

    return (
        varint(1 << 3 | 2) + varint(len(event_id)) + event_id
        + vfield(2, user) + vfield(3, item) + vfield(4, action) + vfield(5, t_ms)
    )  # fmt: skip


def kind_counts(n_inputs: int, rank_share: float, rank_kinds: dict[str, int]) -> dict[str, int]:
    """How many inputs of each kind: ``rank_share`` of them to Rank (``rank_kinds``: kind -> the fewest),
    the rest by STREAM_KINDS, each at least its MIN_PER_KIND."""
    n_rank = round(n_inputs * rank_share)
    total = sum(STREAM_KINDS.values())
    counts = {k: max(MIN_PER_KIND[k], round((n_inputs - n_rank) * w / total)) for k, w in STREAM_KINDS.items()}
    counts["oversized"] = min(counts["oversized"], MAX_OVERSIZED)
    for k, least in rank_kinds.items():
        counts[k] = max(least, n_rank // len(rank_kinds))
    short = n_inputs - sum(counts.values())  # rounding and the oversized cap: top up with garbage
    counts["truncated"] += max(0, short) // 2
    counts["random_bytes"] += max(0, short) - max(0, short) // 2
    return counts


class Generator:
    """Builds a ``Plan`` (module docstring)."""

    def __init__(
        self,
        seed: int,
        items: list[int],
        embeddings: dict[str, np.ndarray],
        new_items: list[int],
        now_ms: int,
        user_base: int = 1_000,
    ):
        self.rng = np.random.default_rng(seed)
        self.items = items  # ingested catalogue items
        self.embeddings = embeddings  # modality -> (n, width) float32, rows for new items
        self.new_items = list(new_items)  # ids not ingested yet (action-before-item, NaN items)
        self.now_ms = now_ms
        self.user_base = user_base
        self.seq = 0

    # ---- helpers ---------------------------------------------------------------------------

    def _eid(self, tag: str) -> str:
        self.seq += 1
        return f"{tag}-{self.seq}"

    def _item(self) -> int:
        return int(self.items[self.rng.integers(len(self.items))])

    def _t(self) -> int:
        return self.now_ms - int(self.rng.integers(0, 600_000))

    def _action(self) -> int:
        return int(self.rng.integers(1, 7))

    def _valid(self, user: int, tag: str = "v") -> Record:
        eid = self._eid(tag)
        value = action_bytes(eid, user, self._item(), self._action(), self._t())
        return Record(tp.USER_ACTIONS, rec.user_key(user), value, VALID, frozenset({APPENDED}), user, eid)

    def _item_event(self, item: int, row: int, poison: str | None = None) -> bytes:
        emb = {m: x[row % len(x)].copy() for m, x in self.embeddings.items()}
        if poison is not None:
            m = sorted(emb)[int(self.rng.integers(len(emb)))]
            emb[m][int(self.rng.integers(len(emb[m])))] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[poison]
        return rec.item_event(item, emb, self.now_ms).SerializeToString()

    # ---- the plan ----------------------------------------------------------------------------

    def plan(self, n_valid: int, counts: dict[str, int], per_user: int = 15) -> Plan:
        n_users = max(4, n_valid // per_user)
        users = [self.user_base + u for u in range(n_users)]
        n_corrupt = max(1, min(8, counts["corrupt_user_state"] // 3))  # 3+ actions each after the corruption
        corrupt = [self.user_base + 500_000 + u for u in range(n_corrupt)]
        valid = [self._valid(users[int(self.rng.integers(n_users))]) for _ in range(n_valid)]
        half = len(valid) // 2
        p1, p2 = valid[:half], valid[half:]
        # Corrupt users: a few valid actions before the corruption, the rest after it.
        p1 += [self._valid(u, "c") for u in corrupt for _ in range(3)]
        after = [self._valid(corrupt[k % n_corrupt], "c") for k in range(counts["corrupt_user_state"])]
        for r in after:
            r.kind, r.expect = "corrupt_user_state", frozenset({rec.CORRUPT_USER_STATE})
        hostile = {k: self._hostile(k, counts[k], users, valid) for k in STREAM_KINDS if k != "corrupt_user_state"}
        h1, h2 = [], []
        for k, rs in hostile.items():
            if k == "duplicate_event_id":  # redeliveries come after their originals: phase 2
                h2 += rs
            else:
                h1 += rs[: len(rs) // 2]
                h2 += rs[len(rs) // 2 :]
        return Plan(
            phase1=self._mix(p1, h1),
            phase2=self._mix(p2, h2 + after),
            corrupt_users=corrupt,
            valid_users=users,
            counts={k: (len(after) if k == "corrupt_user_state" else len(v)) for k, v in hostile.items()}
            | {"corrupt_user_state": len(after)},
        )

    def _mix(self, valid: list[Record], hostile: list[Record]) -> list[Record]:
        """The valid records in their order, the hostile ones at random places between them."""
        slots = np.sort(self.rng.integers(0, len(valid) + 1, size=len(hostile)))
        order = self.rng.permutation(len(hostile))
        out, j = [], 0
        for i, r in enumerate(valid + [None]):
            while j < len(hostile) and slots[j] == i:
                out.append(hostile[order[j]])
                j += 1
            if r is not None:
                out.append(r)
        return out

    def _hostile(self, kind: str, n: int, users: list[int], valid: list[Record]) -> list[Record]:
        make = getattr(self, f"_k_{kind}")
        return [make(k, users, valid) for k in range(n)]

    def _user(self, users: list[int]) -> int:
        return users[int(self.rng.integers(len(users)))]

    def _bad(self, kind, value, expect, user=None, topic=tp.USER_ACTIONS, key=None, note="") -> Record:
        if key is None:
            key = rec.user_key(user) if user is not None else self.rng.bytes(int(self.rng.integers(1, 16)))
        return Record(topic, key, value, kind, frozenset(expect), user, note=note)

    # ---- one generator per hostile kind (k: index within the kind) ----------------------------

    def _k_truncated(self, k, users, valid):
        if k % 3 == 2:  # an item event cut short
            full = self._item_event(self.new_items[0], k)
            cut = int(self.rng.integers(1, len(full)))
            return self._bad("truncated", full[:cut], ANY_ITEM_REFUSAL, topic=tp.ITEM_EVENTS, note=f"item cut {cut}")
        u = self._user(users)
        full = action_bytes(self._eid("trunc"), u, self._item(), self._action(), self._t())
        for _ in range(50):  # a cut that does not parse (a cut at a field boundary would be a valid prefix)
            cut = int(self.rng.integers(1, len(full)))
            try:
                pb.ActionEvent.FromString(full[:cut])
            except DecodeError:
                break
        else:
            cut = 4  # inside the event id: never parses
        return self._bad("truncated", full[:cut], {rec.DECODE_ERROR}, u, note=f"cut at {cut} of {len(full)}")

    def _k_random_bytes(self, k, users, valid):
        if k % 7 == 0:
            return self._bad("random_bytes", b"", {rec.DECODE_ERROR}, note="empty value")
        topic = tp.ITEM_EVENTS if k % 4 == 3 else tp.USER_ACTIONS
        while True:
            value = self.rng.bytes(int(self.rng.integers(1, 600)))
            try:
                parsed = pb.ActionEvent.FromString(value)
            except DecodeError:
                break
            if not parsed.event_id:  # random bytes that would pass as an action are drawn again
                break
        expect = ANY_ITEM_REFUSAL if topic == tp.ITEM_EVENTS else ANY_ACTION_REFUSAL
        return self._bad("random_bytes", value, expect, topic=topic, note=f"{len(value)} random bytes on {topic}")

    def _k_oversized(self, k, users, valid):
        size = int(self.rng.integers(*OVERSIZED_BYTES))
        u = self._user(users)
        if k % 3 == 0:
            return self._bad("oversized", self.rng.bytes(size), ANY_ACTION_REFUSAL, u, note=f"{size} random bytes")
        if k % 3 == 1:
            value = action_bytes("o" * size, u, self._item(), self._action(), self._t())
            return self._bad("oversized", value, {rec.INVALID_FIELD}, u, note=f"{size}-byte event id")
        width = size // 5
        ev = rec.item_event(self.new_items[0], {"text": np.ones(width, np.float32)}, self.now_ms)
        return self._bad(
            "oversized", ev.SerializeToString(), {rec.WRONG_WIDTH}, topic=tp.ITEM_EVENTS, note=f"{width}-wide embedding"
        )

    def _k_wrong_type(self, k, users, valid):
        u = self._user(users)
        variant = k % 5
        if variant == 0:
            value, note = self._item_event(self._item(), k), "an ItemEvent on user-actions"
        elif variant == 1:
            s = pb.TrainingSample(user_id=u, target_item_id=self._item(), event_id=self._eid("ts"), history_tokens=[1])
            value, note = s.SerializeToString(), "a TrainingSample on user-actions"
        elif variant == 2:
            d = pb.DeadLetter(topic=tp.USER_ACTIONS, partition=1, offset=7, raw=b"x", reason="decode_error")
            value, note = d.SerializeToString(), "a DeadLetter on user-actions"
        elif variant == 3:
            from hisam_pb.v1 import rank_pb2

            value = rank_pb2.RankRequest(user_id=u, item_ids=[1, 2], request_id="r").SerializeToString()
            note = "a RankRequest on user-actions"
        else:
            value = action_bytes(self._eid("wt"), u, self._item(), self._action(), self._t())
            return self._bad(
                "wrong_type", value, ANY_ITEM_REFUSAL, topic=tp.ITEM_EVENTS, note="an ActionEvent on items"
            )
        return self._bad("wrong_type", value, ANY_ACTION_REFUSAL, u, note=note)

    def _k_non_finite_embedding(self, k, users, valid):
        item = self.new_items[1 + k % NAN_ITEMS]
        poison = ("nan", "inf", "-inf")[k % 3]
        value = self._item_event(item, k, poison)
        return self._bad(
            "non_finite_embedding", value, {rec.NON_FINITE_EMBEDDING}, topic=tp.ITEM_EVENTS, key=str(item).encode(),
            note=poison,
        )  # fmt: skip

    def _k_huge_ids(self, k, users, valid):
        variant = k % 3
        if variant == 0:  # a huge user with a known item: a legitimate action, appended
            user = I64_MAX - k
            eid = self._eid("huge-user")
            value = action_bytes(eid, user, self._item(), self._action(), self._t())
            return Record(tp.USER_ACTIONS, rec.user_key(user), value, "huge_ids", frozenset({APPENDED}), user, eid,
                          note="user id 2^63-1-k")  # fmt: skip
        if variant == 1:  # a huge item: never ingested, retried, then dead-lettered
            u = self._user(users)
            value = action_bytes(self._eid("huge-item"), u, I64_MAX - k, self._action(), self._t())
            return self._bad("huge_ids", value, {rec.UNKNOWN_ITEM}, u, note="item id 2^63-1-k")
        u = self._user(users)  # a varint of 2^64-1: reads back as -1
        value = _raw_action(self._eid("huge-wire").encode(), u, 2**64 - 1, self._action(), self._t())
        return self._bad("huge_ids", value, {rec.INVALID_FIELD}, u, note="item id 2^64-1 on the wire")

    def _k_negative_ids(self, k, users, valid):
        u = self._user(users)
        variant = k % 3
        if variant == 0:
            value, note = action_bytes(self._eid("neg"), -1 - k, self._item(), 2, self._t()), "negative user"
        elif variant == 1:
            value, note = action_bytes(self._eid("neg"), u, -1 - k, 2, self._t()), "negative item"
        else:
            ev = pb.ItemEvent.FromString(self._item_event(0, k))
            ev.item_id = -1 - k
            return self._bad("negative_ids", ev.SerializeToString(), {rec.INVALID_FIELD}, topic=tp.ITEM_EVENTS,
                             note="negative item event")  # fmt: skip
        return self._bad("negative_ids", value, {rec.INVALID_FIELD}, u, note=note)

    def _k_long_event_id(self, k, users, valid):
        u = self._user(users)
        n = int(self.rng.integers(257, 20_000))
        eid = ("\u00e9" * (n // 2 + 1)) if k % 2 else ("L" * n)  # 2-byte characters: > 256 bytes
        value = action_bytes(eid, u, self._item(), self._action(), self._t())
        return self._bad("long_event_id", value, {rec.INVALID_FIELD}, u, note=f"{len(eid.encode())}-byte event id")

    def _k_non_utf8_event_id(self, k, users, valid):
        u = self._user(users)
        if k % 4 == 3:  # valid UTF-8 with a NUL: refused as a field
            value = action_bytes(f"nul\x00{k}", u, self._item(), self._action(), self._t())
            return self._bad("non_utf8_event_id", value, {rec.INVALID_FIELD}, u, note="NUL in the event id")
        eid = b"\xff\xfe" + self.rng.bytes(int(self.rng.integers(1, 40))) + b"\xc3"
        value = _raw_action(eid, u, self._item(), self._action(), self._t())
        return self._bad("non_utf8_event_id", value, {rec.DECODE_ERROR}, u, note="invalid UTF-8")

    def _k_duplicate_event_id(self, k, users, valid):
        orig = valid[int(self.rng.integers(len(valid) // 2))]  # a phase-1 action, redelivered in phase 2
        if k % 3 == 2:  # the same event id with another item: still the same event
            ev = pb.ActionEvent.FromString(orig.value)
            ev.item_id = self._item()
            value, note = ev.SerializeToString(), "same id, another item"
        else:
            value, note = orig.value, "an exact redelivery"
        return Record(orig.topic, orig.key, value, "duplicate_event_id", frozenset({IGNORED}), orig.user,
                      orig.event_id, note=note)  # fmt: skip

    def _k_future_event_time(self, k, users, valid):
        u = self._user(users)
        variant = k % 4
        t = {0: self.now_ms + 2 * HOUR_MS, 1: self.now_ms + 100 * 365 * 24 * HOUR_MS, 2: I64_MAX}.get(variant)
        if t is None:  # zero or negative: not a time at all
            value = action_bytes(self._eid("t"), u, self._item(), 2, -int(self.rng.integers(0, 10**12)))
            return self._bad("future_event_time", value, {rec.INVALID_FIELD}, u, note="non-positive time")
        value = action_bytes(self._eid("t"), u, self._item(), self._action(), t)
        return self._bad("future_event_time", value, {rec.EVENT_TIME_OUT_OF_RANGE}, u, note=f"time {t}")

    def _k_action_before_item(self, k, users, valid):
        """An action on a new item, its item event right after: retried until the item is in, then appended."""
        u = self._user(users)
        item = self.new_items.pop()
        eid = self._eid("early")
        value = action_bytes(eid, u, item, self._action(), self._t())
        r = Record(tp.USER_ACTIONS, rec.user_key(u), value, "action_before_item", frozenset({APPENDED}), u, eid)
        r.follow.append(Record(tp.ITEM_EVENTS, str(item).encode(), self._item_event(item, k), VALID, ITEM_STORED))
        return r
