"""A publish or a hide killed half-way (serving/repository.py, "Crash safety"), and the writer lock.

The process really dies (``os._exit`` at a fault point, as SIGKILL would leave it) at every
step: a publish with the staging directory written and nothing renamed, and after each of
its three renames; a hide with its intent written and nothing moved, after each of its
moves, and with everything moved but the intent not yet cleared. The repository is then
checked as Triton's poller and the Rank server would see it, and the repair must leave one
complete version: a half publish undone (its number never given again when Triton could
have seen it), a half hide completed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from serving.repository import (
    FAULT_ENV,
    GRAPH_MODELS,
    RepositoryLocked,
    hide_versions,
    publish_version,
    published_versions,
    repair,
    retired_root,
)

SCRIPT = """
import os
import sys
import onnx
from serving.repository import FAULT_ENV, publish_version
graphs = {g: onnx.load(p) for g, p in zip(("ranking", "encode_history", "score_with_cache"), sys.argv[2:5])}
publish_version(sys.argv[1], graphs, fault_point=os.environ[FAULT_ENV])
"""
HIDE = """
import os
import sys
from serving.repository import FAULT_ENV, hide_versions
hide_versions(sys.argv[1], [int(sys.argv[2])], fault_point=os.environ[FAULT_ENV])
"""
HOLD = """
import sys
from serving.repository import repository_lock
with repository_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
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


@pytest.mark.parametrize("point", ["staged", "first_moved", "second_moved", "moved"])
def test_a_publish_killed_half_way_never_counts_and_the_next_one_repairs(point, tiny_export, restamp, tmp_path) -> None:
    repo = tmp_path / "repo"
    first = publish_version(repo, tiny_export.graphs)
    second = restamp(tiny_export.graphs, model_version="hmat-second")
    assert _publish_in_process_that_dies(repo, second, point, tmp_path) == 137

    staging = [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert staging, "the dead publish left its staging directory (what the repair must remove)"
    dirs = _version_dirs(repo)
    if point == "moved":  # every rename done: a complete version (the trainer adopts it on restart)
        assert published_versions(repo) == {1: first.model_version, 2: "hmat-second"}
        assert all(v == ["1", "2"] for v in dirs.values())
    else:
        assert published_versions(repo) == {1: first.model_version}  # only complete versions count
    if point == "staged":
        assert all(v == ["1"] for v in dirs.values())  # nothing renamed: Triton sees no change
    elif point == "first_moved":
        # Renamed first: a cached-path graph, never the full-path one, so Rank's fallback stays old.
        assert dirs["hmat_encode_history"] == ["1", "2"] and dirs["hmat_ranking"] == ["1"]
    elif point == "second_moved":
        assert dirs["hmat_score_with_cache"] == ["1", "2"] and dirs["hmat_ranking"] == ["1"]

    third = publish_version(repo, restamp(tiny_export.graphs, model_version="hmat-third"))
    assert third.created and third.version == (
        2 if point == "staged" else 3
    )  # a number Triton may have seen is skipped
    complete = {1: first.model_version, third.version: "hmat-third"} | ({2: "hmat-second"} if point == "moved" else {})
    assert published_versions(repo) == complete
    assert all(v == sorted(map(str, complete)) for v in _version_dirs(repo).values())
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


@pytest.mark.parametrize("point", ["hide_intent", "hide_first_moved", "hide_second_moved", "hidden"])
def test_a_hide_killed_half_way_is_completed_by_the_repair(point, tiny_export, restamp, tmp_path) -> None:
    repo = tmp_path / "repo"
    first = publish_version(repo, tiny_export.graphs)
    publish_version(repo, restamp(tiny_export.graphs, model_version="hmat-bad"))
    env = {**os.environ, FAULT_ENV: point}
    res = subprocess.run(
        [sys.executable, "-c", HIDE, str(repo), "2"], env=env, capture_output=True, timeout=300, check=False
    )
    assert res.returncode == 137, res.stderr.decode()[-2000:]

    dirs = _version_dirs(repo)
    has_bad = {m for m, v in dirs.items() if "2" in v}
    # Ranking leaves first, encode_history last: the same states as a publish being undone.
    assert (
        has_bad
        == {
            "hide_intent": set(GRAPH_MODELS.values()),
            "hide_first_moved": {"hmat_encode_history", "hmat_score_with_cache"},
            "hide_second_moved": {"hmat_encode_history"},
            "hidden": set(),
        }[point]
    )
    intent = tmp_path / ".repo.hiding"
    assert intent.is_file(), "the intent outlives the crash (what the repair completes)"

    repair(repo)  # what the trainer runs at start-up, and every publish and rollback first
    assert published_versions(repo) == {1: first.model_version}
    assert all(v == ["1"] for v in _version_dirs(repo).values()), "the rollback was completed, not reverted"
    assert not intent.exists()
    retired = retired_root(repo)
    assert all(any(d.name.startswith("2-") for d in (retired / m).iterdir()) for m in GRAPH_MODELS.values())
    # A withdrawn version's number may be given again (docs/design.md, "Model artifacts and versions").
    assert publish_version(repo, restamp(tiny_export.graphs, model_version="hmat-next")).version == 2


def test_one_writer_at_a_time_with_a_timeout_and_a_clear_error(tiny_export, restamp, tmp_path) -> None:
    repo = tmp_path / "repo"
    publish_version(repo, tiny_export.graphs)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(repo)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        graphs = restamp(tiny_export.graphs, model_version="hmat-second")
        t0 = time.monotonic()
        with pytest.raises(RepositoryLocked, match=f"locked by another publish or rollback \\(pid {holder.pid} "):
            publish_version(repo, graphs, lock_timeout_s=0.5)
        assert 0.5 <= time.monotonic() - t0 < 10
        with pytest.raises(RepositoryLocked):
            hide_versions(repo, [1], lock_timeout_s=0.2)
        assert sorted(published_versions(repo)) == [1]  # nothing was touched
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert holder.returncode == 0
    assert publish_version(repo, graphs, lock_timeout_s=5).version == 2  # the lock went with its holder


@pytest.mark.triton
def test_triton_serves_the_parent_again_once_a_rollback_cut_short_is_repaired(tiny_export, restamp, tmp_path) -> None:
    """The real Triton polling the repository: a hide killed after its first move leaves the
    withdrawn model on the cached path; the repair (what a restart runs first) ends that."""
    from infra.triton import models_ready, triton_server, wait_models_ready

    repo = tmp_path / "repo"
    publish_version(repo, tiny_export.graphs)
    publish_version(repo, restamp(tiny_export.graphs, model_version="hmat-bad"))
    cached = [GRAPH_MODELS["encode_history"], GRAPH_MODELS["score_with_cache"]]
    with triton_server(repo, poll_s=0.5) as triton:
        wait_models_ready(triton.url, list(GRAPH_MODELS.values()), 2, timeout_s=60)
        time.sleep(3)  # a few polls: Triton's first polls after start reload what it just loaded
        env = {**os.environ, FAULT_ENV: "hide_first_moved"}
        res = subprocess.run(
            [sys.executable, "-c", HIDE, str(repo), "2"], env=env, capture_output=True, timeout=300, check=False
        )
        assert res.returncode == 137, res.stderr.decode()[-2000:]
        wait_models_ready(triton.url, [GRAPH_MODELS["ranking"]], 1, timeout_s=60)
        assert models_ready(triton.url, cached, 2)[0], "the cut-short hide left the bad model on the cached path"

        repair(repo)
        wait_models_ready(triton.url, list(GRAPH_MODELS.values()), 1, timeout_s=60)
        assert not any(models_ready(triton.url, [m], 2)[0] for m in GRAPH_MODELS.values())
