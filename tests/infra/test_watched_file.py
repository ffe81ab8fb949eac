"""infra/watched_file.py: read once, read again on change, a bad later read keeps the value in force."""

from __future__ import annotations

import os

import pytest

from infra import watched_file
from infra.triton_access import CLIENT_HEADER, GRPC_PREFIX, TritonAccess
from infra.watched_file import WatchedFile


def _upper(text: str) -> str:
    if not text.strip():
        raise ValueError("is empty")
    return text.strip().upper()


def _age(path, seconds: float = 10.0) -> None:
    """Set the file's times into the past, beyond the racy window, as an unchanged file would be."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns - int(seconds * 1e9), st.st_mtime_ns - int(seconds * 1e9)))


def test_reads_once_while_unchanged_and_again_on_change(tmp_path, monkeypatch) -> None:
    path = tmp_path / "f"
    path.write_text("one\n")
    calls = []

    def parse(text: str) -> str:
        calls.append(text)
        return _upper(text)

    f = WatchedFile(path, parse, "test file")
    _age(path)
    # ctime cannot be set back; take a clock far enough ahead that the file is not "racy".
    now = os.stat(path).st_ctime_ns + watched_file.RACY_NS + 1
    monkeypatch.setattr(watched_file.time, "time_ns", lambda: now)
    assert f.value() == "ONE"  # the stamp changed with utime: read once more
    n = len(calls)
    for _ in range(50):
        assert f.value() == "ONE"
    assert len(calls) == n, "an unchanged file is not read again"
    path.write_text("two-two\n")
    monkeypatch.setattr(watched_file.time, "time_ns", lambda: os.stat(path).st_ctime_ns + watched_file.RACY_NS + 1)
    assert f.value() == "TWO-TWO"


def test_a_quick_same_size_rewrite_is_seen(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_text("aaaa")
    f = WatchedFile(path, _upper)
    path.write_text("bbbb")  # same size, within the file-time tick
    assert f.value() == "BBBB"


def test_bad_later_content_keeps_the_value_and_bad_start_is_an_error(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_text("good")
    f = WatchedFile(path, _upper, "key file")
    path.write_text("")
    assert f.value() == "GOOD"
    path.unlink()
    assert f.value() == "GOOD"
    with pytest.raises(ValueError, match=r"key file .*missing: .*No such file"):
        WatchedFile(tmp_path / "missing", _upper, "key file")
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ValueError, match=r"key file .*empty: is empty"):
        WatchedFile(tmp_path / "empty", _upper, "key file")


def test_triton_client_key_follows_rotation_without_a_new_access(tmp_path) -> None:
    key = tmp_path / "key"
    key.write_text("key-1\n")
    access = TritonAccess(key_file=key)
    assert access.headers() == {GRPC_PREFIX + CLIENT_HEADER: "key-1"}
    key.write_text("key-2\n")
    assert access.headers() == {GRPC_PREFIX + CLIENT_HEADER: "key-2"}
    assert access.http_headers() == {CLIENT_HEADER: "key-2"}
    key.write_text("bad key\n")  # refused: the key in force stays
    assert access.headers() == {GRPC_PREFIX + CLIENT_HEADER: "key-2"}
