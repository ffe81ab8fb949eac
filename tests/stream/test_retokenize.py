"""Re-tokenisation of a namespace (stream/retokenize/, ``hisam tokenizer migrate``).

Streams are built by real appends under tokenizer A into real Redis / SQLite namespaces,
then migrated into a new namespace under tokenizer B (both tiny but really trained).
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import replace

import numpy as np
import pytest

from features import encoding as enc
from features.store import (
    AppliedOffset,
    ItemSids,
    OnlineStoreConfig,
    StreamAction,
    feast_read_item_sids,
    feast_read_streams,
    open_feature_store,
    open_stream_store,
)
from recipes.tokenizer.testing import TINY_MODALITIES, synthetic_items
from stream import records as rec
from stream.retokenize import (
    AMBIGUOUS_SID,
    ITEM_NOT_IN_SOURCE,
    UNKNOWN_SID,
    ItemCatalogue,
    MigrationError,
    catalogue_from_dataset,
    catalogue_from_item_events,
    check_namespaces,
    encode_catalogue,
    migrate_namespace,
    verify_namespace,
)

pytestmark = pytest.mark.redis

T, W = 5, 8  # W > T: ids evicted from a stream are still remembered
N_ITEMS = 30
T0 = 1_700_000_000_000


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(A, B, B's directory): two really trained tiny tokenizers of different kinds, 6 codes each."""
    from recipes.tokenizer.testing import tiny_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    a = tiny_tokenizer(root / "a", kind="dst", n_items=128, epochs=2, seed=0)
    b = tiny_tokenizer(root / "b", kind="rqvae", n_items=128, epochs=2, seed=1)
    assert a.n_codes == b.n_codes == 6 and a.version != b.version
    return a, b, root / "b"


@pytest.fixture(scope="module")
def items():
    """(features, present) of the catalogue; item id = row."""
    feats, present, _ = synthetic_items(N_ITEMS, TINY_MODALITIES, seed=7)
    return feats, present


def _item_event_bytes(feats, present, rows, time_ms: int = T0) -> list[bytes]:
    return [
        rec.item_event(int(i), {m: feats[m][i] for m in feats if present[m][i]}, time_ms).SerializeToString()
        for i in rows
    ]


@pytest.fixture(params=["sqlite", "redis"])
def namespaces(request, tmp_path, redis_url):
    """(source config, target config): fresh projects, each with its own feature repo."""
    run = uuid.uuid4().hex[:8]
    common = {
        "backend": request.param,
        "redis_url": redis_url if request.param == "redis" else None,
        "stream_len": T,
        "seen_window": W,
    }
    src = OnlineStoreConfig(repo_dir=tmp_path / "src", project=f"t_src_{run}", **common)
    dst = OnlineStoreConfig(repo_dir=tmp_path / "dst", project=f"t_dst_{run}", **common)
    return src, dst


@pytest.fixture
def open_store():
    """``open_store(cfg)``: a stream store that is closed after the test, whether it passed or not."""
    opened = []

    def open_(cfg):
        opened.append(open_stream_store(cfg))
        return opened[-1]

    yield open_
    for store in opened:
        store.close()


def _fill_source(open_store, cfg, tok, feats, present, n_users: int = 6, seed: int = 3):
    """Item SIDs under A (collision-free, as a migration writes them) and streams by real appends.

    Returns (store, {event id: item id}); users append 3..14 actions (beyond T and W) and
    some redeliveries (duplicates, not appended).
    """
    store = open_store(cfg)
    tokens = tok.encode_batch(feats, present, taken=[])
    store.put_item_sids([ItemSids(i, tuple(tokens[i].tolist()), tok.version, T0) for i in range(N_ITEMS)])
    rng = np.random.default_rng(seed)
    item_of: dict[str, int] = {}
    for u in range(1, n_users + 1):
        acts = []
        for k in range(3 + 2 * u):
            i = int(rng.integers(N_ITEMS))
            acts.append(
                StreamAction(u, f"u{u}-e{k}", i, int(rng.integers(1, 5)), T0 + 1000 * k, tuple(tokens[i].tolist()))
            )
            item_of[acts[-1].event_id] = i
        store.append_batch(acts[: len(acts) // 2])
        store.append_batch(acts[len(acts) // 2 - 1 :])  # one redelivery
    return store, item_of


def _raw_snapshot(cfg, store) -> object:
    """Every stored byte of a namespace, from the backend itself (not through our readers)."""
    if cfg.backend == "redis":
        client = store._client
        keys = sorted(
            k for k in client.scan_iter(match=b"*" + cfg.project.encode()) if k.endswith(cfg.project.encode())
        )
        return {k: client.hgetall(k) for k in keys}
    conn = sqlite3.connect(cfg.sqlite_db)
    try:
        names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {n: sorted(conn.execute(f'SELECT * FROM "{n}"').fetchall()) for n in names if n.startswith(cfg.project)}
    finally:
        conn.close()


def _catalogue(feats, present) -> ItemCatalogue:
    return catalogue_from_item_events(_item_event_bytes(feats, present, range(N_ITEMS)), TINY_MODALITIES)


def test_streams_move_to_the_new_tokenizer_with_every_event_and_the_seen_window(
    namespaces, tokenizers, items, open_store
) -> None:
    src_cfg, dst_cfg = namespaces
    a, b, _ = tokenizers
    feats, present = items
    src, item_of = _fill_source(open_store, src_cfg, a, feats, present)
    new_tokens = b.encode_batch(feats, present, taken=[])  # B's collision-free encoding, item-id order
    assert not np.array_equal(new_tokens, a.encode_batch(feats, present, taken=[]))
    users = src.entity_ids()
    before_states = src.read_user_states(users.tolist())
    before_raw = _raw_snapshot(src_cfg, src)

    fs = open_feature_store(dst_cfg)
    report = migrate_namespace(src, dst_cfg, b, _catalogue(feats, present), progress=False, feast_store=fs)

    assert report.verified, report.verify_failures
    assert report.n_unmapped == 0 and report.users_with_unmapped == 0
    assert report.users == len(users) == 6 and report.verified_users == 6 and report.sampled_users == 6
    assert report.feast_checked_users == 6
    assert report.events == report.events_mapped == sum(len(s.stream) for s in before_states)
    assert report.items_written == report.old_items == N_ITEMS
    assert report.old_tokenizer_versions == {a.version: N_ITEMS}
    assert _raw_snapshot(src_cfg, src) == before_raw  # the source namespace is untouched

    dst = open_store(dst_cfg)
    assert np.array_equal(dst.entity_ids(), users)
    after = dst.read_user_states(users.tolist())
    for old, new in zip(before_states, after):
        o, n = old.stream, new.stream
        assert n.event_ids == o.event_ids  # every event, in order
        np.testing.assert_array_equal(n.tokens, new_tokens[[item_of[e] for e in o.event_ids]])
        np.testing.assert_array_equal(n.actions, o.actions)
        np.testing.assert_array_equal(n.event_times_ms, o.event_times_ms)
        assert new.seen_ids == old.seen_ids
        assert (new.n_actions, new.last_action_ms) == (old.n_actions, old.last_action_ms)
    sids = dst.read_item_sids(range(N_ITEMS))
    assert {i: s.tokens for i, s in sids.items()} == {i: tuple(new_tokens[i].tolist()) for i in range(N_ITEMS)}
    assert {s.tokenizer_version for s in sids.values()} == {b.version}

    # Feast reads the new namespace (streams, counters, items) from its own repo.
    via = feast_read_streams(fs, users.tolist(), b.n_codes)
    assert [v.event_ids for v in via] == [s.stream.event_ids for s in after]
    assert all(np.array_equal(v.tokens, s.stream.tokens) for v, s in zip(via, after))
    prof = fs.get_online_features(
        features=["user_profile:n_actions", "user_profile:last_action_ms"],
        entity_rows=[{"user_id": int(u)} for u in users],
    ).to_dict()
    assert prof["n_actions"] == [s.n_actions for s in before_states]
    assert prof["last_action_ms"] == [s.last_action_ms for s in before_states]
    assert feast_read_item_sids(fs, [0, 999]) == {0: new_tokens[0].tolist(), 999: None}

    # Appends continue in the new namespace: an old id evicted from the stream but still in
    # the window is a duplicate; a new action is appended after the migrated history.
    u = 6
    old = before_states[u - 1]
    assert len(old.seen_ids) == W > len(old.stream) == T  # the window reaches past the stream
    evicted = next(e for e in old.seen_ids if e not in old.stream.event_ids)
    i = item_of[evicted]
    dup, fresh = dst.append_batch(
        [
            StreamAction(u, evicted, i, 1, T0, tuple(new_tokens[i].tolist())),
            StreamAction(u, "u6-new", 0, 2, T0 + 10**6, tuple(new_tokens[0].tolist())),
        ]
    )
    assert dup.duplicate and not dup.resampled
    assert fresh.appended
    np.testing.assert_array_equal(fresh.history_tokens, after[u - 1].stream.tokens)
    (s6,) = dst.read_user_states([u])
    assert s6.stream.event_ids == [*old.stream.event_ids[1:], "u6-new"] and s6.n_actions == old.n_actions + 1


def test_a_written_user_state_is_byte_for_byte_what_the_appends_wrote(
    namespaces, tokenizers, items, open_store
) -> None:
    """write_user_states(read_user_states(...)) into another project reproduces the append's layout exactly."""
    src_cfg, dst_cfg = namespaces
    a, _, _ = tokenizers
    feats, present = items
    src, _ = _fill_source(open_store, src_cfg, a, feats, present)
    dst = open_store(dst_cfg)
    users = src.entity_ids().tolist()
    dst.write_user_states(src.read_user_states(users))
    src_raw, dst_raw = _raw_snapshot(src_cfg, src), _raw_snapshot(dst_cfg, dst)
    if src_cfg.backend == "redis":
        user_keys = {enc.redis_key(src_cfg.project, enc.USER_ID_KEY, u): u for u in users}
        assert len(user_keys) == 6 and set(user_keys) <= set(src_raw)
        for key, u in user_keys.items():
            assert dst_raw[enc.redis_key(dst_cfg.project, enc.USER_ID_KEY, u)] == src_raw[key]
    else:
        for view in (enc.USER_STREAM_FV, enc.USER_PROFILE_FV, "hisam_seen"):
            rows = src_raw[f"{src_cfg.project}_{view}"]
            assert rows and dst_raw[f"{dst_cfg.project}_{view}"] == rows


def test_unmappable_events_are_left_out_reported_and_still_remembered(
    namespaces, tokenizers, items, open_store
) -> None:
    src_cfg, dst_cfg = namespaces
    a, b, _ = tokenizers
    feats, present = items
    src, item_of = _fill_source(open_store, src_cfg, a, feats, present, n_users=2)
    a_tokens = a.encode_batch(feats, present, taken=[])
    # Item 0 shares item 1's old SIDs (the live path does not resolve collisions): ambiguous.
    src.put_item_sids([ItemSids(0, tuple(a_tokens[1].tolist()), a.version, T0)])
    stale = tuple(int(x) + 1 for x in a_tokens[2])  # SIDs no item of the old table holds
    assert stale not in {tuple(t) for t in a_tokens.tolist()}
    src.append_batch(
        [
            StreamAction(9, "x-ambiguous", 0, 1, T0, tuple(a_tokens[1].tolist())),
            StreamAction(9, "x-stale", 2, 1, T0 + 1, stale),
            StreamAction(9, "x-ok", 3, 2, T0 + 2, tuple(a_tokens[3].tolist())),
            StreamAction(9, "x-gone", 4, 3, T0 + 3, tuple(a_tokens[4].tolist())),
        ]
    )
    # Item 4 has no event in the item source: its events cannot be re-encoded.
    cat = catalogue_from_item_events(
        _item_event_bytes(feats, present, [i for i in range(N_ITEMS) if i != 4]), TINY_MODALITIES
    )
    # Events already in the streams on item 0 now carry SIDs no item holds; on item 1, SIDs
    # two items hold; on item 4, the SIDs of an item the source lacks.
    held = [item_of[e] for s in src.read_streams(src.entity_ids().tolist()) for e in s.event_ids if e in item_of]
    on_old = {i: held.count(i) for i in (0, 1, 4)}

    seen = []
    report = migrate_namespace(src, dst_cfg, b, cat, progress=False, on_unmapped=seen.append, verify_sample=100)

    assert report.verified, report.verify_failures  # verification accounts for what was left out
    assert report.unmapped == {
        AMBIGUOUS_SID: 1 + on_old[1],
        UNKNOWN_SID: 1 + on_old[0],
        ITEM_NOT_IN_SOURCE: 1 + on_old[4],
    }
    assert {u.event_id for u in seen if u.user_id == 9} == {"x-ambiguous", "x-stale", "x-gone"}
    assert report.n_unmapped == len(seen) and report.events == report.events_mapped + len(seen)
    assert {u.reason for u in seen if u.event_id == "x-stale"} == {UNKNOWN_SID}
    assert report.unmapped_examples and report.unmapped_examples[0]["reason"] in report.unmapped
    dst = open_store(dst_cfg)
    (s9,) = dst.read_user_states([9])
    assert s9.stream.event_ids == ["x-ok"]
    assert s9.seen_ids == ["x-ambiguous", "x-stale", "x-ok", "x-gone"] and s9.n_actions == 4
    # A redelivery of a left-out event is still a duplicate in the new namespace.
    b_tokens = b.encode_batch(feats, present, taken=[])
    assert dst.append(StreamAction(9, "x-stale", 2, 1, T0 + 1, tuple(b_tokens[2].tolist()))).duplicate
    # The table says what happened.
    table = report.table()
    (line,) = [x for x in table.splitlines() if x.startswith("unmapped ")]
    assert line.split()[1] == str(len(seen)) and AMBIGUOUS_SID in line
    json.loads(report.to_json())


def test_verification_fails_when_the_source_changed_and_reruns_need_overwrite(
    namespaces, tokenizers, items, open_store
) -> None:
    src_cfg, dst_cfg = namespaces
    a, b, _ = tokenizers
    feats, present = items
    src, _ = _fill_source(open_store, src_cfg, a, feats, present, n_users=3)
    cat = _catalogue(feats, present)
    assert migrate_namespace(src, dst_cfg, b, cat, progress=False).verified
    # A stream worker still writing to the source after the copy: the target no longer matches.
    (it,) = src.read_item_sids([5]).values()
    src.append(StreamAction(2, "late", 5, 1, T0 + 10**7, it.tokens))
    from stream.retokenize import build_token_map

    tmap = build_token_map({i: s.tokens for i, s in src.read_item_sids(range(N_ITEMS)).items()},
                           dict(enumerate(map(tuple, b.encode_batch(feats, present, taken=[]).tolist()))))  # fmt: skip
    dst = open_store(dst_cfg)
    check = verify_namespace(src, dst, tmap, {}, src.entity_ids(), sample=0)
    assert check.users == 3 and len(check.failures) == 1 and check.failures[0].startswith("user 2:")
    with pytest.raises(MigrationError, match="already holds 3 user streams"):
        migrate_namespace(src, dst_cfg, b, cat, progress=False)
    again = migrate_namespace(src, dst_cfg, b, cat, progress=False, overwrite=True)
    assert again.verified and "late" in dst.read_streams([2])[0].event_ids


def test_dry_run_writes_nothing(namespaces, tokenizers, items, open_store) -> None:
    src_cfg, dst_cfg = namespaces
    a, b, _ = tokenizers
    feats, present = items
    src, _ = _fill_source(open_store, src_cfg, a, feats, present, n_users=2)
    report = migrate_namespace(src, dst_cfg, b, _catalogue(feats, present), progress=False, dry_run=True)
    assert report.verified is None and report.items_written == 0
    assert report.users == 2 and report.events > 0 and report.n_unmapped == 0
    if dst_cfg.backend == "sqlite":
        assert not dst_cfg.sqlite_db.exists()
    else:
        assert not list(src._client.scan_iter(match=b"*" + dst_cfg.project.encode()))


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, tokenizers) -> None:
    _, b, _ = tokenizers
    src = OnlineStoreConfig(repo_dir=tmp_path / "a", project="hisam")
    with pytest.raises(MigrationError, match="same namespace"):
        check_namespaces(src, replace(src, repo_dir=tmp_path / "b", sqlite_path=src.sqlite_db), b)
    with pytest.raises(MigrationError, match="share the feature repo"):
        check_namespaces(src, replace(src, project="other"), b)
    dst = OnlineStoreConfig(repo_dir=tmp_path / "b", project="new")
    with pytest.raises(MigrationError, match="emits 6 codes per item, the target store is configured for 4"):
        check_namespaces(src, replace(dst, n_codes=4), b)
    with pytest.raises(MigrationError, match="less than the source"):
        check_namespaces(src, replace(dst, stream_len=10), b)
    check_namespaces(src, dst, b)  # a separate project and repo: accepted
    text_only = ItemCatalogue(
        np.arange(2), {"text": np.zeros((2, 24), np.float32)}, {"text": np.ones(2, bool)}, np.zeros(2, np.int64)
    )
    with pytest.raises(MigrationError, match="modalities"):
        encode_catalogue(b, text_only)


def test_source_items_of_another_code_length_are_refused(namespaces, tokenizers, items, open_store) -> None:
    src_cfg, dst_cfg = namespaces
    a, b, _ = tokenizers
    feats, present = items
    _fill_source(open_store, src_cfg, a, feats, present, n_users=1)  # the source the wrong config reads
    wrong = open_store(replace(src_cfg, n_codes=4))
    with pytest.raises(MigrationError, match=r"items have \[6\] tokens each.*configured for 4"):
        migrate_namespace(wrong, dst_cfg, b, _catalogue(feats, present), progress=False)


def test_catalogue_keeps_each_items_last_valid_event_and_matches_the_dataset(tokenizers, items) -> None:
    import pandas as pd

    from data import ItemTable
    from stream.producer import item_events

    _, b, _ = tokenizers
    feats, present = items
    present = {m: p.copy() for m, p in present.items()}
    present["behaviour"][3] = False  # a missing modality travels as an absent embedding
    feats = {m: np.where(present[m][:, None], x, 0).astype(np.float32) for m, x in feats.items()}
    table = ItemTable(
        ids=np.arange(N_ITEMS, dtype=np.int64),
        external_ids=[f"i{i}" for i in range(N_ITEMS)],
        features=feats,
        present=present,
        titles=[""] * N_ITEMS,
        meta=pd.DataFrame(index=range(N_ITEMS)),
    )
    events = [e.SerializeToString() for e in item_events(table, T0)]
    # Item 7 first arrives with other features; a later event with a wrong width is refused.
    early = rec.item_event(7, {m: feats[m][8] for m in feats}, T0 - 5).SerializeToString()
    bad = rec.item_event(7, {"text": np.zeros(3)}, T0 + 5).SerializeToString()
    cat = catalogue_from_item_events([early, *events, bad], TINY_MODALITIES)
    ref = catalogue_from_dataset(table, T0)
    assert cat.rejected == {rec.WRONG_WIDTH: 1}
    np.testing.assert_array_equal(cat.item_ids, ref.item_ids)
    for m in TINY_MODALITIES:
        np.testing.assert_array_equal(cat.features[m], ref.features[m])
        np.testing.assert_array_equal(cat.present[m], ref.present[m])
    tokens, moved = encode_catalogue(b, cat, batch_size=7)  # batches do not change the result
    np.testing.assert_array_equal(tokens, b.encode_batch(feats, present, taken=[]))
    assert len({tuple(t) for t in tokens.tolist()}) == N_ITEMS  # collision-free
    assert moved.sum() == N_ITEMS - len({tuple(t) for t in b.encode_batch(feats, present).tolist()})


def test_command_rejects_a_wrong_tokenizer_dir_and_an_in_place_target(tmp_path, tokenizers, caplog) -> None:
    from hisam.cli import main

    _, _, b_dir = tokenizers
    assert main(["tokenizer", "migrate", "--tokenizer", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "cannot load the new tokenizer" in caplog.text and "config.json" in caplog.text
    caplog.clear()
    repo = tmp_path / "repo"
    same = ["--from-repo-dir", str(repo), "--to-repo-dir", str(repo), "--to-project", "hisam"]
    assert main(["tokenizer", "migrate", "--tokenizer", str(b_dir), *same, "--no-progress"]) == 2
    assert "same namespace" in caplog.text
    caplog.clear()
    missing = ["--from-repo-dir", str(repo), "--items-from", "dataset"]
    assert main(["tokenizer", "migrate", "--tokenizer", str(b_dir), *missing, "--no-progress"]) == 2
    assert "no source online store" in caplog.text
    assert not (tmp_path / "repo").exists()


@pytest.mark.kafka
def test_command_migrates_from_the_item_topic(tmp_path, kafka_bootstrap, tokenizers, items, open_store) -> None:
    """``hisam tokenizer migrate`` end to end: item modalities read back from a real topic."""
    from hisam.cli import main
    from stream import producer as prod
    from stream import topics as tp

    a, b, b_dir = tokenizers
    feats, present = items
    topic = f"items-{uuid.uuid4().hex[:8]}"
    tp.ensure_topics(kafka_bootstrap, [tp.TopicSpec(topic, 2)])
    producer = prod.make_producer(kafka_bootstrap)
    try:
        for i, value in enumerate(_item_event_bytes(feats, present, range(N_ITEMS))):
            producer.send(topic, key=str(i).encode(), value=value)
        producer.send(topic, key=b"3", value=b"not an item event")
        producer.flush()
    finally:
        producer.close()
    src_cfg = OnlineStoreConfig(repo_dir=tmp_path / "src", project="hisam", stream_len=T, seen_window=W)
    src, _ = _fill_source(open_store, src_cfg, a, feats, present, n_users=4)
    src.append_batch([], applied={(tp.USER_ACTIONS, 1): AppliedOffset(41, 1_700_000_000_000)})
    src.close()  # the command opens the store itself
    report_path = tmp_path / "report.json"
    argv = [
        "tokenizer", "migrate", "--tokenizer", str(b_dir), "--bootstrap", kafka_bootstrap, "--item-topic", topic,
        "--from-repo-dir", str(src_cfg.repo_dir), "--stream-len", str(T), "--seen-window", str(W),
        "--report", str(report_path), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["verified"] and report["users"] == 4 and report["n_unmapped"] == 0
    assert report["items_in_source"] == N_ITEMS and report["items_rejected"] == {rec.DECODE_ERROR: 1}
    assert report["feast_checked_users"] == 4
    # The defaults: project hisam_<version> in the feature repo beside the source's.
    project = "hisam_" + b.version.replace("-", "_")
    dst_cfg = OnlineStoreConfig(repo_dir=tmp_path / f"src_{project}", project=project, stream_len=T, seen_window=W)
    assert report["target"] == f"sqlite:{dst_cfg.sqlite_db.resolve()}#{project}"
    assert json.loads((dst_cfg.repo_dir / "feature_store.yaml").read_text())["project"] == project
    dst = open_store(dst_cfg)
    assert len(dst.entity_ids()) == 4
    # The source's applied record goes with its streams: the target's workers resume after it.
    assert dst.applied_offsets(tp.USER_ACTIONS) == {1: AppliedOffset(41, 1_700_000_000_000)}
    dst.close()
    # Running it again refuses to overwrite the target that now holds streams.
    assert main(argv) == 2


def test_an_empty_source_is_refused(namespaces, tokenizers, items, open_store) -> None:
    src_cfg, dst_cfg = namespaces
    _, b, _ = tokenizers
    feats, present = items
    src = open_store(src_cfg)
    with pytest.raises(MigrationError, match="holds no items and no users"):
        migrate_namespace(src, dst_cfg, b, _catalogue(feats, present), progress=False)
