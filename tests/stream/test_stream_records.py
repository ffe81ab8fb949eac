"""Pure decoding/validation and the batch processors (real SQLite store, real tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest

from features.actions import label_of
from features.store import ItemSids, OnlineStoreConfig, open_stream_store
from hisam_pb.v1 import events_pb2 as pb
from stream import records as rec
from stream.processing import ActionProcessor, ItemProcessor


def _msg(value: bytes, offset: int = 0, topic: str = "user-actions") -> rec.RawMessage:
    return rec.RawMessage(topic, 0, offset, b"k", value)


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (b"", rec.DECODE_ERROR),
        (b"\xff\xff\xff", rec.DECODE_ERROR),
        (rec.action_event("", 1, 2, 2, 5).SerializeToString(), rec.INVALID_FIELD),
        (rec.action_event("a\x00b", 1, 2, 2, 5).SerializeToString(), rec.INVALID_FIELD),
        (rec.action_event("e", -1, 2, 2, 5).SerializeToString(), rec.INVALID_FIELD),
        (rec.action_event("e", 1, 2, 0, 5).SerializeToString(), rec.INVALID_FIELD),
        (rec.action_event("e", 1, 2, 99, 5).SerializeToString(), rec.INVALID_FIELD),
        (rec.action_event("e", 1, 2, 2, 0).SerializeToString(), rec.INVALID_FIELD),
    ],
)
def test_decode_action_rejects_with_reason(event: bytes, reason: str) -> None:
    with pytest.raises(rec.EventRejected) as e:
        rec.decode_action(event)
    assert e.value.reason == reason


def test_decode_action_accepts_valid() -> None:
    ev = rec.decode_action(rec.action_event("e1", 3, 4, pb.ACTION_TYPE_CLICK, 7).SerializeToString())
    assert (ev.event_id, ev.user_id, ev.item_id, ev.action, ev.event_time_ms) == ("e1", 3, 4, pb.ACTION_TYPE_CLICK, 7)
    assert label_of(pb.ACTION_TYPE_CLICK) == 1.0 and label_of(pb.ACTION_TYPE_SKIP) == 0.0


MODS = {"text": 4, "image": 2}


@pytest.mark.parametrize(
    ("emb", "reason"),
    [
        ({"text": [1, 2, 3, float("nan")]}, rec.NON_FINITE_EMBEDDING),
        ({"text": [1, 2, 3, float("inf")]}, rec.NON_FINITE_EMBEDDING),
        ({"text": [1, 2, 3]}, rec.WRONG_WIDTH),
        ({"audio": [1, 2]}, rec.UNKNOWN_MODALITY),
        ({}, rec.NO_EMBEDDING),
    ],
)
def test_decode_item_rejects_with_reason(emb, reason: str) -> None:
    raw = rec.item_event(1, {k: np.asarray(v, np.float32) for k, v in emb.items()}, 5).SerializeToString()
    with pytest.raises(rec.EventRejected) as e:
        rec.decode_item(raw, MODS)
    assert e.value.reason == reason


def test_decode_item_keeps_present_modalities_only() -> None:
    raw = rec.item_event(9, {"image": np.array([0.5, -1.0]), "text": None}, 5, title="t").SerializeToString()
    f = rec.decode_item(raw, MODS)
    assert list(f.features) == ["image"] and f.features["image"].dtype == np.float32
    assert f.event.item_id == 9 and f.event.title == "t"


def test_training_sample_carries_history_target_and_label() -> None:
    ev = rec.action_event("e", 1, 2, pb.ACTION_TYPE_LIKE, 5)
    s = rec.training_sample(ev, np.arange(12).reshape(2, 6), np.array([1, 5]), tuple(range(100, 106)), "v1")
    assert list(s.history_tokens) == list(range(12)) and list(s.history_actions) == [1, 5]
    assert list(s.target_tokens) == list(range(100, 106)) and s.n_codes == 6
    assert (s.label, s.tokenizer_version, s.event_id, s.target_item_id) == (1.0, "v1", "e", 2)


@pytest.mark.parametrize("n_hist", [0, 1, 300])
@pytest.mark.parametrize(
    "ev",
    [
        rec.action_event("ev-é", 2**40, 77, pb.ACTION_TYPE_PURCHASE, 1_700_000_000_123),
        rec.action_event("e", 0, 0, pb.ACTION_TYPE_SKIP, 0),  # zero scalars are left out
        rec.action_event("", -3, -(2**62), pb.ACTION_TYPE_CLICK, -1),  # negatives: 10-byte varints
        rec.action_event("x" * 300, 127, 128, pb.ACTION_TYPE_LIKE, 2**63 - 1),  # varint length boundaries
    ],
)
def test_training_sample_bytes_equal_the_protobuf_serialisation(n_hist: int, ev) -> None:
    from features import encoding as enc

    tokens = np.arange(n_hist * 6).reshape(n_hist, 6) * 997  # multi-byte varints
    actions = np.arange(n_hist) % 7
    for target, version in [(tuple(range(5000, 5006)), "tok-v2"), ((0, 1, 2, 3, 4, 5), ""), ((), "v")]:
        want = rec.training_sample(ev, tokens, actions, target, version).SerializeToString()
        got = rec.training_sample_bytes(
            ev, enc.varints(tokens.ravel().tolist()), enc.varints(actions.tolist()), target, version
        )
        assert got == want


@pytest.fixture
def sqlite_store(tmp_path):
    store = open_stream_store(OnlineStoreConfig(backend="sqlite", repo_dir=tmp_path, stream_len=3, n_codes=6))
    yield store
    store.close()


def test_action_processor_appends_emits_samples_and_dead_letters(sqlite_store) -> None:
    sqlite_store.put_item_sids([ItemSids(i, tuple(range(i * 10, i * 10 + 6)), "v1", 0) for i in (1, 2)])
    batch = [
        _msg(rec.action_event("a", 7, 1, 2, 10).SerializeToString(), 0),
        _msg(b"junk", 1),
        _msg(rec.action_event("b", 7, 3, 2, 11).SerializeToString(), 2),  # item 3 unknown
        _msg(rec.action_event("c", 7, 2, 3, 12).SerializeToString(), 3),
        _msg(rec.action_event("a", 7, 1, 2, 10).SerializeToString(), 4),  # redelivery
    ]
    out = ActionProcessor(sqlite_store).process(batch)
    assert (out.appended, out.duplicates) == (2, 1)
    reasons = {pb.DeadLetter.FromString(v).offset: pb.DeadLetter.FromString(v).reason for _, v in out.dead_letters}
    assert reasons == {1: rec.DECODE_ERROR, 2: rec.UNKNOWN_ITEM}
    samples = [pb.TrainingSample.FromString(v) for _, v in out.samples]
    # The redelivery is not appended, but its sample is sent again (same bytes: the trainer drops repeats).
    assert [s.event_id for s in samples] == ["a", "c", "a"]
    assert out.samples[2][1] == out.samples[0][1]
    assert list(samples[0].history_tokens) == [] and list(samples[1].history_tokens) == list(range(10, 16))
    assert list(samples[1].history_actions) == [2]
    (s,) = sqlite_store.read_streams([7])
    assert s.event_ids == ["a", "c"]


def test_item_processor_tokenizes_and_dead_letters(sqlite_store, tiny_tokenizer_dir) -> None:
    from models.tokenizer import FrozenTokenizer
    from recipes.tokenizer.testing import synthetic_items

    tok = FrozenTokenizer.load(tiny_tokenizer_dir)
    feats, _, _ = synthetic_items(4, tok.modalities, seed=3)
    good = [{m: feats[m][i] for m in tok.modalities} for i in range(3)]
    good[1].pop(next(iter(tok.modalities)))
    bad = {m: np.full(w, np.nan, np.float32) for m, w in tok.modalities.items()}
    batch = [
        _msg(rec.item_event(100 + i, e, 5).SerializeToString(), i, "item-events") for i, e in enumerate([*good, bad])
    ]
    out = ItemProcessor(sqlite_store, tok).process(batch)
    assert out.items_written == 3
    assert [pb.DeadLetter.FromString(v).reason for _, v in out.dead_letters] == [rec.NON_FINITE_EMBEDDING]
    stored = sqlite_store.read_item_sids([100, 101, 102, 103])
    assert sorted(stored) == [100, 101, 102]
    for i in range(3):
        assert list(stored[100 + i].tokens) == tok.encode(good[i]).tolist()
        assert stored[100 + i].tokenizer_version == tok.version


def test_item_processor_gives_items_with_one_natural_id_distinct_ids(sqlite_store, tiny_tokenizer_dir) -> None:
    """Identical items (the same film listed twice): the first keeps its natural ID, the later
    ones take the nearest free last code, in arrival order; an item sent again keeps its ID."""
    from models.tokenizer import FrozenTokenizer
    from recipes.tokenizer.testing import synthetic_items

    tok = FrozenTokenizer.load(tiny_tokenizer_dir)
    feats, _, _ = synthetic_items(2, tok.modalities, seed=5)
    same = {m: feats[m][0] for m in tok.modalities}
    other = {m: feats[m][1] for m in tok.modalities}
    proc = ItemProcessor(sqlite_store, tok)

    def ingest(items: list[tuple[int, dict]]):
        batch = [_msg(rec.item_event(i, e, 5).SerializeToString(), k, "item-events") for k, (i, e) in enumerate(items)]
        return proc.process(batch)

    out = ingest([(200, same), (201, same), (202, other)])
    assert (out.items_written, out.items_moved) == (3, 1)
    ids = {i: it.tokens for i, it in sqlite_store.read_item_sids([200, 201, 202]).items()}
    natural = tuple(tok.encode(same).tolist())
    codes, dist = tok.encode_codes(same, None, batched=False)
    # the nearest last code other than the natural one
    nearest_other = next(int(k) for k in np.argsort(dist[0], kind="stable") if k != codes[0, -1])
    assert ids[200] == natural
    assert ids[201] == (*natural[:-1], int(tok.token_offsets[-1]) + nearest_other)
    assert ids[202] == tuple(tok.encode(other).tolist())
    out = ingest([(201, same), (203, same)])  # 201 again keeps its ID; 203 moves further
    assert sqlite_store.read_item_sids([201])[201].tokens == ids[201]
    assert out.items_moved == 2
    assert len({*ids.values(), sqlite_store.read_item_sids([203])[203].tokens}) == 4
