"""The stream worker's deletion processor (stream/deletions.py) on real SQLite namespaces: every
namespace deleted from, one tombstone per user, bad requests dead-lettered, a redelivered batch
a no-op in the store (its tombstones sent again while the grace period lasts)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from features.store import OnlineStoreConfig, StreamAction, open_stream_store
from hisam_pb.v1 import events_pb2 as pb
from serving.deletions import TOMBSTONE_TOPIC
from stream import records as rec
from stream import topics as tp
from stream.deletions import DeletionProcessor, DeletionSettings, deletion_record, namespace_config

N_CODES = 6


def test_deletes_from_every_namespace_emits_tombstones_and_dead_letters_bad_requests(tmp_path) -> None:
    own = OnlineStoreConfig(repo_dir=tmp_path / "new", project="hisam_new", n_codes=N_CODES, stream_len=5)
    old = replace(own, repo_dir=tmp_path / "old", project="hisam")
    stores = [open_stream_store(old), open_stream_store(own)]
    for s in stores:
        s.append_batch(
            [StreamAction(u, f"e{u}-{k}", k, 2, 5 + k, tuple(range(N_CODES))) for u in (1, 2) for k in range(3)]
        )
    proc = DeletionProcessor(stores, DeletionSettings(grace_s=60), app_id="g")
    key, value = deletion_record(1, "a request")
    bad_user = pb.UserDeletion(user_id=-5).SerializeToString()
    batch = [
        rec.RawMessage(tp.USER_DELETIONS, 0, 10, key, value),
        rec.RawMessage(tp.USER_DELETIONS, 0, 11, b"x", b"\xff\x00garbage"),
        rec.RawMessage(tp.USER_DELETIONS, 0, 12, b"-5", bad_user),
    ]
    out = proc.process(batch)
    assert [s.read_streams([1, 2])[0] for s in stores] == [None, None]
    assert all(len(s.read_streams([2])[0]) == 3 for s in stores)
    ((k, v),) = out.tombstones
    t = pb.UserTombstone.FromString(v)
    assert k == b"1" and t.user_id == 1 and list(t.projects) == ["hisam", "hisam_new"] and t.app_id == "g"
    assert t.until_ms - t.deleted_ms == 60_000
    reasons = [pb.DeadLetter.FromString(d).reason for _, d in out.dead_letters]
    assert reasons == [rec.DECODE_ERROR, rec.INVALID_FIELD]
    # Redelivered (a crash before the ack): nothing deleted again, the same tombstone again.
    stores[1].append(StreamAction(2, "e2-9", 9, 2, 99, tuple(range(N_CODES))))
    again = proc.process(batch[:1])
    assert [pb.UserTombstone.FromString(v).until_ms for _, v in again.tombstones] == [t.until_ms]
    assert len(stores[1].read_streams([2])[0]) == 4  # the other user is untouched
    # A request for a user with nothing stored is still a deletion (and a marker).
    assert len(proc.process([rec.RawMessage(tp.USER_DELETIONS, 1, 0, *deletion_record(77))]).tombstones) == 1
    for s in stores:
        s.close()


def test_options_and_requests_are_checked(tmp_path) -> None:
    own = OnlineStoreConfig(repo_dir=tmp_path / "repo", project="hisam_new")
    open_stream_store(replace(own, repo_dir=tmp_path / "old", project="hisam")).close()
    got = namespace_config(own, f"hisam@{tmp_path / 'old'}")
    assert (got.project, got.sqlite_db) == ("hisam", tmp_path / "old" / "online.db")
    with pytest.raises(ValueError, match="no online store"):
        namespace_config(own, f"hisam@{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="identifier"):
        namespace_config(own, "not-a-project")
    with pytest.raises(ValueError, match="own namespace"):
        namespace_config(replace(own, repo_dir=tmp_path / "old", project="hisam"), "hisam")
    redis_own = OnlineStoreConfig(backend="redis", redis_url="redis://127.0.0.1:1/0", project="hisam_new")
    assert namespace_config(redis_own, "hisam").project == "hisam"
    with pytest.raises(ValueError, match="SQLite"):
        namespace_config(redis_own, "hisam@/tmp")
    with pytest.raises(ValueError, match="non-negative"):
        deletion_record(-1)
    with pytest.raises(ValueError, match="256 bytes"):
        deletion_record(1, "x" * 300)
    with pytest.raises(ValueError, match="grace"):
        DeletionSettings(grace_s=-1)
    assert TOMBSTONE_TOPIC == tp.USER_TOMBSTONES  # serving names the topic without importing stream
