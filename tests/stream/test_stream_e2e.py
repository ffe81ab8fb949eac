"""The stream against the real broker and a real Redis, with the worker as a real process.

One worker serves the module (tests use disjoint users and items); the crash test kills it
with SIGKILL and starts it again. Every check reads back what the worker wrote, through
Feast where the contract is Feast's.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict

import numpy as np
import pytest

from features.actions import label_of
from features.store import ItemSids, OnlineStoreConfig, feast_read_streams, open_feature_store, open_stream_store
from hisam_pb.v1 import events_pb2 as pb
from stream import producer as prod
from stream import records as rec
from stream import topics as tp
from stream.testing import WorkerProcess, consume_all, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.redis]

T = 50
N_CODES = 6
RUN = uuid.uuid4().hex[:8]  # event ids unique per run, so a reused broker/Redis cannot interfere
BASE = (int(time.time()) % 100_000) * 10_000  # user/item id base, likewise


@pytest.fixture(scope="module")
def env(kafka_bootstrap, redis_url, tiny_tokenizer_dir, tmp_path_factory):
    repo = tmp_path_factory.mktemp("stream_repo")
    # A namespace of this module's own on the session's Redis (layout and applied offsets are per namespace).
    cfg = OnlineStoreConfig(
        backend="redis", redis_url=redis_url, repo_dir=repo, project=f"t_e2e_{RUN}", stream_len=T, n_codes=N_CODES
    )
    tp.ensure_topics(kafka_bootstrap, tp.default_topics(4))

    def worker_args(instance_id: str) -> list[str]:
        return [
            "--bootstrap", kafka_bootstrap, "--backend", "redis", "--redis-url", redis_url,
            "--repo-dir", str(repo), "--project", cfg.project, "--stream-len", str(T), "--n-codes", str(N_CODES),
            "--tokenizer", str(tiny_tokenizer_dir), "--app-id", f"hisam-test-{RUN}",
            "--within-ms", "20", "--session-timeout", "6", "--instance-id", instance_id,
            # Batches of 500 (the default) put up to ~100 actions of one of the crash tests'
            # users in one uncommitted span, over T = 50: only the seen window (W = 1024 ids
            # per user, independent of T) keeps their redelivery from being appended twice.
            "--batch-size", "500",
            # Actions on unknown items wait 2 s for their item (the retry topic), not 30.
            "--unknown-item-max-age", "2",
        ]  # fmt: skip

    worker = WorkerProcess(worker_args(f"worker-{RUN}"), repo / "worker.log")
    worker.start()
    store = open_stream_store(cfg)
    fs = open_feature_store(cfg)
    producer = prod.make_producer(kafka_bootstrap, linger_ms=2)
    # Items known to the store up front (ingestion itself is tested below).
    store.put_item_sids(
        [ItemSids(BASE + i, tuple(BASE + i * 10 + j for j in range(N_CODES)), "test-v", 0) for i in range(40)]
    )
    yield {
        "cfg": cfg, "worker": worker, "worker_args": worker_args, "store": store, "fs": fs, "producer": producer,
        "bootstrap": kafka_bootstrap, "repo": repo,
    }  # fmt: skip
    producer.close()
    worker.stop()
    store.close()


def _events(users: range, per_user: int, tag: str) -> list[pb.ActionEvent]:
    """Interleaved actions of several users, each user's in increasing time."""
    evs = []
    for k in range(per_user):
        for u in users:
            item = BASE + (u * 7 + k) % 40
            evs.append(rec.action_event(f"{RUN}-{tag}-{u}-{k}", BASE + u, item, 1 + (k % 5), 1_700_000_000_000 + k))
    return evs


def _n_actions(fs, user_ids) -> list[int | None]:
    got = fs.get_online_features(
        features=["user_profile:n_actions"], entity_rows=[{"user_id": u} for u in user_ids]
    ).to_dict()
    return got["n_actions"]


def _check_streams(env, evs: list[pb.ActionEvent]) -> None:
    by_user: dict[int, list[pb.ActionEvent]] = defaultdict(list)
    for e in evs:
        by_user[e.user_id].append(e)
    users = sorted(by_user)
    streams = feast_read_streams(env["fs"], users, N_CODES)
    counts = _n_actions(env["fs"], users)
    for u, s, n in zip(users, streams, counts):
        mine = by_user[u]
        assert n == len(mine), f"user {u}: {n} appends counted for {len(mine)} actions"
        assert s.event_ids == [e.event_id for e in mine[-T:]]  # exactly once, in order, bounded
        np.testing.assert_array_equal(s.actions, [e.action for e in mine[-T:]])
        np.testing.assert_array_equal(s.tokens[:, 0], [BASE + (e.item_id - BASE) * 10 for e in mine[-T:]])


def test_replay_appends_every_action_once_in_order_bounded_and_emits_samples(env) -> None:
    evs = _events(range(20), per_user=80, tag="replay")
    prod.produce_actions(env["producer"], evs)
    users = sorted({e.user_id for e in evs})
    wait_until(lambda: sum(n or 0 for n in _n_actions(env["fs"], users)) >= len(evs), 60, 0.3, "all appends")
    _check_streams(env, evs)

    wanted = {e.event_id for e in evs}
    samples: dict[str, pb.TrainingSample] = {}

    def have_all(records) -> bool:
        for r in records[len(have_all.seen) :]:
            s = pb.TrainingSample.FromString(r.value)
            if s.event_id in wanted:
                samples[s.event_id] = s
        have_all.seen = records[:]
        return len(samples) == len(wanted)

    have_all.seen = []
    consume_all(env["bootstrap"], tp.TRAINING_SAMPLES, have_all, timeout_s=60)
    # History = the user's previous actions (bounded to T), oldest first; target = this item.
    by_user: dict[int, list[pb.ActionEvent]] = defaultdict(list)
    for e in evs:
        prev = by_user[e.user_id][-T:]
        s = samples[e.event_id]
        assert list(s.history_actions) == [p.action for p in prev]
        assert list(s.history_tokens)[::N_CODES] == [BASE + (p.item_id - BASE) * 10 for p in prev]
        assert s.target_item_id == e.item_id and s.target_tokens[0] == BASE + (e.item_id - BASE) * 10
        assert s.label == label_of(e.action) and s.tokenizer_version == "test-v"
        by_user[e.user_id].append(e)


def test_killed_worker_restarts_without_losing_or_doubling(env) -> None:
    evs = _events(range(100, 110), per_user=200, tag="crash")
    users = sorted({e.user_id for e in evs})
    sender = threading.Thread(target=prod.produce_actions, args=(env["producer"], evs, 1500.0))
    sender.start()
    wait_until(lambda: sum(n or 0 for n in _n_actions(env["fs"], users)) >= 300, 60, 0.05, "first appends")
    env["worker"].kill()  # mid-stream: a batch may be written but its offsets not committed
    done_before = sum(n or 0 for n in _n_actions(env["fs"], users))
    assert done_before < len(evs), "the worker finished before it could be killed mid-stream"
    env["worker"].start()
    sender.join()
    wait_until(lambda: sum(n or 0 for n in _n_actions(env["fs"], users)) >= len(evs), 90, 0.3, "appends after restart")
    time.sleep(1.0)  # any redelivered batch lands now; it must change nothing
    _check_streams(env, evs)


def test_crash_right_after_a_store_write_neither_loses_nor_doubles(env) -> None:
    """The worst moment, made deterministic: a batch is in the store, its offsets are not.

    The worker exits (fault injection, as abrupt as SIGKILL) right after the store write of
    a full batch of 500, before the batch's samples or acks: the whole batch, ~100 actions
    per user here, twice T, is redelivered to the restarted worker and must change nothing.
    With an idempotency window of the last T ids it double-counted every run.
    """
    evs = _events(range(200, 205), per_user=300, tag="fault")
    users = sorted({e.user_id for e in evs})
    worker = env["worker"]
    worker.stop()  # a backlog first, so that the worker reads full batches
    prod.produce_actions(env["producer"], evs)
    worker.start(extra_env={"HISAM_FAULT_EXIT_AFTER_APPENDS": "600"})
    assert worker.wait_exit(120) == 137, worker.log_tail()
    done_before = sum(n or 0 for n in _n_actions(env["fs"], users))
    assert 600 <= done_before < len(evs), done_before
    worker.start()
    wait_until(lambda: sum(n or 0 for n in _n_actions(env["fs"], users)) >= len(evs), 90, 0.3, "appends after restart")
    time.sleep(1.0)  # any further redelivery lands now; it must change nothing
    _check_streams(env, evs)


def test_a_worker_joining_and_leaving_the_group_neither_loses_nor_doubles_nor_reorders(env) -> None:
    """Two rebalances mid-stream: partitions move to a second worker and back.

    Batches fetched before a rebalance are dropped unprocessed (faust seeks back to the
    committed offsets), the batch in flight is finished and committed before its
    partitions move, and whatever is redelivered anyway changes nothing.
    """
    evs = _events(range(600, 612), per_user=400, tag="rebalance")
    users = sorted({e.user_id for e in evs})
    # An empty instance id: a dynamic member, which leaves the group when stopped (a static
    # member keeps its partitions until it comes back).
    second = WorkerProcess(env["worker_args"](""), env["repo"] / "worker2.log")
    # The stream is sent in three parts: before the second worker joins, while both work,
    # and after it left, so that each rebalance happens mid-stream however long a join takes.
    thirds = [evs[: len(evs) // 3], evs[len(evs) // 3 : 2 * len(evs) // 3], evs[2 * len(evs) // 3 :]]
    joined, left = threading.Event(), threading.Event()

    def send() -> None:
        prod.produce_actions(env["producer"], thirds[0], 400.0)
        joined.wait(90)
        prod.produce_actions(env["producer"], thirds[1], 400.0)
        left.wait(90)
        prod.produce_actions(env["producer"], thirds[2], 400.0)

    sender = threading.Thread(target=send)
    joins_before = env["worker"].log_tail(10**7).count("Joined group")
    second.start()
    sender.start()
    try:
        wait_until(lambda: "Joined group" in second.log_tail(10**6), 60, 0.05, "the second worker in the group")
        joined.set()
        time.sleep(1.5)  # both work on the stream
        done_while_two = sum(n or 0 for n in _n_actions(env["fs"], users))
        second.stop()  # leaves: another rebalance gives its partitions back
        assert done_while_two < len(evs), "the stream ended before the second worker left"
    finally:
        joined.set()
        left.set()
        second.stop()
        sender.join()
    wait_until(lambda: sum(n or 0 for n in _n_actions(env["fs"], users)) >= len(evs), 90, 0.3, "all appends")
    time.sleep(1.0)  # any redelivered batch lands now; it must change nothing
    _check_streams(env, evs)
    # Both rebalances happened: the first worker joined the group again twice.
    assert env["worker"].log_tail(10**7).count("Joined group") >= joins_before + 2, env["worker"].log_tail()


def test_bad_events_land_in_dead_letters_with_their_reason(env, tiny_tokenizer_dir) -> None:
    from models.tokenizer import FrozenTokenizer

    mods = FrozenTokenizer.load(tiny_tokenizer_dir).modalities
    name, width = next(iter(mods.items()))
    ok_vec = np.ones(width, np.float32)
    nan_vec = ok_vec.copy()
    nan_vec[2] = np.nan
    p = env["producer"]
    cases = {
        "garbage-action": (tp.USER_ACTIONS, b"\xff\x00not a protobuf", rec.DECODE_ERROR),
        "unknown-item": (
            tp.USER_ACTIONS,
            rec.action_event(f"{RUN}-u", BASE + 300, 987_654_321, 2, 5).SerializeToString(),
            rec.UNKNOWN_ITEM,
        ),
        "no-action": (
            tp.USER_ACTIONS,
            rec.action_event(f"{RUN}-n", BASE + 300, BASE, 0, 5).SerializeToString(),
            rec.INVALID_FIELD,
        ),
        "nan-embedding": (
            tp.ITEM_EVENTS,
            rec.item_event(BASE + 900, {name: nan_vec}, 5).SerializeToString(),
            rec.NON_FINITE_EMBEDDING,
        ),
        "wrong-width": (
            tp.ITEM_EVENTS,
            rec.item_event(BASE + 901, {name: np.ones(width + 1)}, 5).SerializeToString(),
            rec.WRONG_WIDTH,
        ),
        "unknown-modality": (
            tp.ITEM_EVENTS,
            rec.item_event(BASE + 902, {"smell": ok_vec}, 5).SerializeToString(),
            rec.UNKNOWN_MODALITY,
        ),
        "garbage-item": (tp.ITEM_EVENTS, b"\x0a\xff\xff", rec.DECODE_ERROR),
    }
    for case, (topic, value, _) in cases.items():
        p.send(topic, key=f"{RUN}-{case}".encode(), value=value)
    p.flush()
    found: dict[str, pb.DeadLetter] = {}

    def have_all(records) -> bool:
        for r in records:
            d = pb.DeadLetter.FromString(r.value)
            case = d.key.decode(errors="replace").removeprefix(f"{RUN}-")
            if case in cases:
                found[case] = d
        return len(found) == len(cases)

    # The unknown item's action is retried for --unknown-item-max-age (2 s) first.
    consume_all(env["bootstrap"], tp.DEAD_LETTERS, have_all, timeout_s=90)
    for case, (topic, value, reason) in cases.items():
        d = found[case]
        assert (d.reason, d.topic, d.raw) == (reason, topic, value), case
        assert d.detail and d.error_time_ms > 0
    # Nothing was half-applied: the invalid items were not stored, the user has no stream.
    assert env["store"].read_item_sids([BASE + 900, BASE + 901, BASE + 902]) == {}
    assert env["store"].read_streams([BASE + 300]) == [None]


def test_new_item_is_readable_through_feast_right_after_its_event(env, tiny_tokenizer_dir) -> None:
    from features.store import feast_read_item_sids
    from models.tokenizer import FrozenTokenizer
    from recipes.tokenizer.testing import synthetic_items

    tok = FrozenTokenizer.load(tiny_tokenizer_dir)
    feats, _, _ = synthetic_items(3, tok.modalities, seed=7)
    item = BASE + 5000
    emb = {m: feats[m][0] for m in tok.modalities}
    emb.pop(next(iter(tok.modalities)))  # one modality missing: the tokenizer imputes it
    t0 = time.perf_counter()
    prod.produce_items(env["producer"], [rec.item_event(item, emb, 1_700_000_000_000, title="new")])
    got = wait_until(lambda: feast_read_item_sids(env["fs"], [item])[item], 30, 0.02, "the new item's IDs")
    latency_ms = (time.perf_counter() - t0) * 1000
    assert got == tok.encode(emb).tolist()
    # ... and an action on it is appended at once (the item is usable immediately).
    ev = rec.action_event(f"{RUN}-new", BASE + 400, item, 2, 1_700_000_000_001)
    prod.produce_actions(env["producer"], [ev])
    (s,) = wait_until(
        lambda: [x for x in feast_read_streams(env["fs"], [BASE + 400], N_CODES) if x], 30, 0.05, "append"
    )
    assert s.event_ids == [ev.event_id] and s.tokens[0].tolist() == got
    print(f"new item visible through Feast {latency_ms:.0f} ms after produce")
