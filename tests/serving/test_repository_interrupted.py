"""A publish killed half-way (serving/repository.py): nothing half-published counts, the next publish repairs.

The publishing process really dies (``os._exit`` at a fault point, as SIGKILL would leave
it): once with the staging directory written and nothing renamed, once right after the
first model's version was renamed into place. The repository is then checked as Triton's
poller and the Rank server would see it, and a new publish must clean up and count on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from serving.repository import FAULT_ENV, GRAPH_MODELS, publish_version, published_versions

SCRIPT = """
import os
import sys
import onnx
from serving.repository import FAULT_ENV, publish_version
graphs = {g: onnx.load(p) for g, p in zip(("ranking", "encode_history", "score_with_cache"), sys.argv[2:5])}
publish_version(sys.argv[1], graphs, fault_point=os.environ[FAULT_ENV])
"""


def _publish_in_process_that_dies(repo: Path, graphs: dict[str, onnx.ModelProto], point: str, tmp: Path) -> int:
    paths = []
    for g in ("ranking", "encode_history", "score_with_cache"):
        p = tmp / f"{g}.onnx"
        onnx.save(graphs[g], str(p))
        paths.append(str(p))
    env = {**os.environ, FAULT_ENV: point}
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(repo), *paths], env=env, capture_output=True, timeout=300, check=False
    )
    return res.returncode


def _version_dirs(repo: Path) -> dict[str, list[str]]:
    return {m: sorted(d.name for d in (repo / m).iterdir() if d.name.isdigit()) for m in GRAPH_MODELS.values()}


@pytest.mark.parametrize("point", ["staged", "first_moved"])
def test_a_publish_killed_half_way_never_counts_and_the_next_one_repairs(point, tiny_export, restamp, tmp_path) -> None:
    repo = tmp_path / "repo"
    first = publish_version(repo, tiny_export.graphs)
    second = restamp(tiny_export.graphs, model_version="hmat-second")
    assert _publish_in_process_that_dies(repo, second, point, tmp_path) == 137

    assert published_versions(repo) == {1: first.model_version}  # only complete versions count
    staging = [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert staging, "the dead publish left its staging directory (what the repair must remove)"
    dirs = _version_dirs(repo)
    if point == "staged":
        assert all(v == ["1"] for v in dirs.values())  # nothing renamed: Triton sees no change
    else:
        # Renamed first: a cached-path graph, never the full-path one, so Rank's fallback stays old.
        assert dirs["hmat_encode_history"] == ["1", "2"] and dirs["hmat_ranking"] == ["1"]

    third = publish_version(repo, restamp(tiny_export.graphs, model_version="hmat-third"))
    assert third.created and third.version == (
        2 if point == "staged" else 3
    )  # a number Triton may have seen is skipped
    assert published_versions(repo) == {1: first.model_version, third.version: "hmat-third"}
    assert all(v == ["1", str(third.version)] for v in _version_dirs(repo).values())
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
