"""``hisam data prepare`` through the real CLI entry point."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hisam import cli


def test_prepare_prints_summary(
    write_custom: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_custom()
    assert cli.main(["data", "prepare", "--dataset", str(root), "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for key in ("items", "users", "interactions", "train", "test", "positive rate (all)", "cold users", "cold items"):
        assert f"\n{key} " in out
    assert "interactions             120" in out and "train                    108" in out


def test_prepare_reports_bad_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "prepare", "--dataset", "nosuch", "--data-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().out == ""
