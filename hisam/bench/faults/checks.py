"""Producing the plan, waiting for the worker to drain it, and judging what became of every record.

Judgement, per record: its dead letters (matched by the SHA-256 of its value, which every
DeadLetter carries, and its source topic), and for actions that must be appended, the user's
stored stream. Per user the stored event ids must equal the expected valid ids in order (the
last T of them); an action that came before its item is appended when its retry finds the
item, after whatever of its user came meanwhile (stream/app.py), so it is checked for
exactly-once presence and the order is checked on the others.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tqdm import tqdm

from hisam.bench.faults.inputs import APPENDED, IGNORED, VALID, Plan, Record
from hisam_pb.v1 import events_pb2 as pb
from stream import records as rec
from stream import topics as tp

log = logging.getLogger(__name__)

PRODUCER_MAX_REQUEST = 8 << 20


def producer(bootstrap: str):
    from stream import producer as prod

    p = prod.make_producer(bootstrap, linger_ms=5)
    p.config["max_request_size"] = PRODUCER_MAX_REQUEST  # room for the 1-2 MB records
    return p


def produce(p, records: list[Record], desc: str) -> list[tuple[Record, str]]:
    """Send ``records`` (each followed by its ``follow`` records) in order; returns the sends the broker refused."""
    from kafka.errors import KafkaError

    pending = []
    for r in tqdm(records, desc=desc, unit="rec", leave=False, mininterval=1.0):
        for x in (r, *r.follow):
            pending.append((x, p.send(x.topic, key=x.key, value=x.value)))
    p.flush(120)
    refused = []
    for x, fut in pending:
        try:
            fut.get(60)
        except KafkaError as e:  # the broker refused it (e.g. too large): reported, not raised
            refused.append((x, f"{type(e).__name__}: {e}"))
    return refused


@dataclass
class Drain:
    seconds: float
    stalled: list[str]  # "topic[p]: committed c of end e" of partitions that did not reach their end


def wait_drained(bootstrap: str, group: str, topics: list[str], timeout_s: float, alive=lambda: True) -> Drain:
    """Wait until ``group``'s committed offsets reach every partition's end, twice in a row."""
    from infra.kafka import Offsets

    offsets = Offsets(bootstrap, client_id=f"{group}-bench-watch")
    t0 = time.monotonic()
    streak, behind = 0, []
    try:
        with tqdm(desc="drain", unit="rec", leave=False) as bar:
            while True:
                behind, left = [], 0
                for topic in topics:
                    ends = offsets.end(topic)
                    done = offsets.committed(group, topic)
                    for part, end in sorted(ends.items()):
                        c = done.get(part, 0)
                        if c < end:
                            behind.append(f"{topic}[{part}]: committed {c} of end {end}")
                            left += end - c
                bar.set_postfix(left=left)
                streak = streak + 1 if not behind else 0
                if streak >= 2:
                    return Drain(time.monotonic() - t0, [])
                if time.monotonic() - t0 > timeout_s:
                    return Drain(time.monotonic() - t0, behind)
                if not alive():
                    log.warning("the worker is not running while draining (%d left)", left)
                time.sleep(0.5)
    finally:
        offsets.close()


def dead_letters(bootstrap: str) -> list[pb.DeadLetter]:
    """Every record of the dead-letter topic (the broker is the bench's own: all are this run's)."""
    from infra.kafka import Offsets
    from stream.testing import consume_all

    offsets = Offsets(bootstrap, client_id="bench-faults-dl")
    try:
        total = sum(offsets.end(tp.DEAD_LETTERS).values())
    finally:
        offsets.close()
    records = consume_all(bootstrap, tp.DEAD_LETTERS, lambda rs: len(rs) >= total, timeout_s=120)
    return [pb.DeadLetter.FromString(r.value) for r in records]


def _sha(value: bytes | None) -> bytes:
    return hashlib.sha256(value or b"").digest()


@dataclass
class Verdict:
    """What became of the plan's records, and of the users' streams."""

    sent: Counter = field(default_factory=Counter)  # kind -> records
    dead_by_reason: Counter = field(default_factory=Counter)  # reason -> dead letters
    dead_by_kind: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # kind -> reason -> n
    unexpected: list[str] = field(default_factory=list)  # the first few records whose fate was not an expected one
    n_unexpected: int = 0
    unmatched_dead_letters: int = 0  # dead letters of no record of the plan
    lost_actions: int = 0
    doubled_actions: int = 0
    misordered_users: int = 0
    stream_problems: list[str] = field(default_factory=list)
    valid_actions: int = 0
    corrupt_user_actions: int = 0  # actions of corrupted users after the corruption (not in the valid set)
    send_refused: list[str] = field(default_factory=list)
    early_item_refused: int = 0  # actions before their item whose item event was refused (not valid then)

    def flag(self, r: Record, got: str) -> None:
        self.n_unexpected += 1
        if len(self.unexpected) < 20:
            self.unexpected.append(
                f"{r.kind} ({r.note or r.event_id}, {r.topic}): expected {sorted(r.expect)}, got {got}"
            )


def judge(
    plan: Plan, letters: list[pb.DeadLetter], store, stream_len: int, refused: list, before_corruption: dict[int, list]
) -> Verdict:
    """``before_corruption``: the corrupted users' stored event ids just before the corruption (their
    streams cannot be read after it; what they must hold then is their phase-1 actions)."""
    v = Verdict()
    records = list(plan.records())
    by_hash: dict[tuple[str, bytes], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_hash[(r.topic, _sha(r.value))].append(i)
        if r.kind != VALID or r.topic == tp.USER_ACTIONS:
            v.sent[r.kind] += 1
    v.valid_actions = sum(1 for r in records if r.kind == VALID and r.topic == tp.USER_ACTIONS)
    v.corrupt_user_actions = v.sent["corrupt_user_state"]
    fate: dict[int, list[str]] = defaultdict(list)
    for d in letters:
        v.dead_by_reason[d.reason] += 1
        idx = by_hash.get((d.topic, d.raw_sha256), [])
        # identical values (e.g. empty ones): the next record of that value not matched yet
        free = [i for i in idx if not fate[i]] or idx
        if not free:
            v.unmatched_dead_letters += 1
            continue
        fate[free[0]].append(d.reason)
        v.dead_by_kind[records[free[0]].kind][d.reason] += 1
    # An action sent before its item whose item event was refused (sid_space_full: every ID the
    # collision rule may give it is taken, a documented refusal) can never be appended: it must
    # be dead-lettered as unknown_item instead, and is not a valid action.
    index = {id(r): i for i, r in enumerate(records)}
    for r in records:
        for f in r.follow:
            if fate.get(index[id(f)]):
                r.expect = frozenset({rec.UNKNOWN_ITEM})
                v.early_item_refused += 1
    for r, why in refused:
        v.send_refused.append(f"{r.kind} ({r.note}): {why}"[:300])
    refused_ids = {id(r) for r, _ in refused}

    # Streams: the expected appended ids per user, in send order.
    want: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        if r.topic == tp.USER_ACTIONS and APPENDED in r.expect and id(r) not in refused_ids:
            want[r.user].append(r)
    users = sorted(want)
    streams = dict(before_corruption)
    readable = [u for u in users if u not in before_corruption]
    for start in range(0, len(readable), 200):
        chunk = readable[start : start + 200]
        for u, s in zip(chunk, store.read_streams(chunk), strict=True):
            streams[u] = [] if s is None else list(s.event_ids)
    for u in users:
        got = streams[u]
        counts = Counter(got)
        expected = [r.event_id for r in want[u]]
        exp_set = set(expected)
        v.doubled_actions += sum(n - 1 for e, n in counts.items() if n > 1)
        tail = expected[-stream_len:]
        lost = [e for e in tail if counts[e] == 0]
        v.lost_actions += len(lost)
        foreign = [e for e in got if e not in exp_set]
        early = {r.event_id for r in want[u] if r.kind == "action_before_item"}
        in_order = [e for e in got if e not in early and e in exp_set]
        want_order = [e for e in tail if e not in early and counts[e] > 0]
        misordered = in_order != want_order
        v.misordered_users += misordered
        if (lost or foreign or misordered) and len(v.stream_problems) < 10:
            v.stream_problems.append(f"user {u}: lost {lost[:5]}, foreign {foreign[:5]}, stored {got[-8:]}")
    # Each record's fate against what it may become.
    for i, r in enumerate(records):
        if id(r) in refused_ids:
            continue
        reasons = fate.get(i, [])
        if APPENDED in r.expect and r.topic == tp.ITEM_EVENTS:
            if reasons and not set(reasons) <= r.expect:
                v.flag(r, f"dead-lettered {reasons}")
            continue
        if r.expect == {APPENDED} or r.expect == {IGNORED}:
            if reasons:
                v.flag(r, f"dead-lettered {reasons}")
            continue
        if len(reasons) != 1 or reasons[0] not in r.expect:
            v.flag(r, f"dead letters {reasons}" if reasons else "no dead letter")
    return v
