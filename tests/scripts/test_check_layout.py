"""The layout check (scripts/check_layout.py): passes on the repository, fails on planted faults.

Each planted fault goes into a small tree of its own, laid out like the repository (one module
per package), so a test shows the check failing for exactly that reason and naming the file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "scripts" / "check_layout.py"


def run_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK), "--root", str(root)], check=False, capture_output=True, text=True
    )


def write(root: Path, rel: str, text: str = "") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A clean miniature of the layout: every import goes along the arrows."""
    for pkg in ("models", "infra", "features", "stream", "serving", "hisam"):
        write(tmp_path, f"{pkg}/__init__.py")
    write(tmp_path, "models/model.py", "import torch\n")
    write(tmp_path, "infra/ports.py", "import socket\n")
    write(tmp_path, "features/store.py", "from hisam_pb.v1 import events_pb2\n")
    write(tmp_path, "stream/app.py", "from features.store import x\nfrom infra import ports\n")
    write(tmp_path, "serving/ranking.py", "import models.model\n")
    write(tmp_path, "hisam/cli.py", "from stream import app\nfrom serving.ranking import Ranker\n")
    return tmp_path


def test_the_repository_passes() -> None:
    got = run_check(REPO)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "layout check passed" in got.stdout


def test_a_clean_tree_passes_and_prints_the_imports_between_packages(tree: Path) -> None:
    got = run_check(tree)
    assert got.returncode == 0, got.stdout
    assert "stream -> features: 1" in got.stdout and "hisam -> serving: 1" in got.stdout


def test_a_planted_upward_import_fails_and_names_the_file(tree: Path) -> None:
    # Lazily, inside a function: it still counts.
    write(tree, "serving/online.py", "def f():\n    from hisam.cli import main\n    return main\n")
    got = run_check(tree)
    assert got.returncode == 1
    assert "serving/online.py:2: serving.online imports hisam.cli, against the arrows" in got.stdout


def test_a_lower_layer_importing_a_higher_one_fails(tree: Path) -> None:
    write(tree, "models/mask.py", "from features import store\n")
    got = run_check(tree)
    assert got.returncode == 1
    assert "models.mask imports features.store" in got.stdout and "nothing of the project" in got.stdout


def test_an_import_circle_fails_with_its_edges(tree: Path) -> None:
    write(tree, "models/a.py", "from models import b\n")
    write(tree, "models/b.py", "def f():\n    import models.a\n")
    got = run_check(tree)
    assert got.returncode == 1
    assert "import circle between models.a, models.b: models.a -> models.b; models.b -> models.a" in got.stdout


def test_type_checking_imports_do_not_count(tree: Path) -> None:
    write(tree, "models/a.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from features import store\n")
    assert run_check(tree).returncode == 0


def test_a_file_over_600_lines_fails_but_a_test_file_does_not(tree: Path) -> None:
    write(tree, "stream/big.py", "x = 1\n" * 601)
    write(tree, "tests/test_big.py", "x = 1\n" * 900)
    got = run_check(tree)
    assert got.returncode == 1
    assert "stream/big.py: 601 lines (at most 600" in got.stdout and "test_big" not in got.stdout
