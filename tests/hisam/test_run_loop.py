"""``hisam run``, the whole loop, as a new user runs it (issue 7): once to the end, once stopped by Ctrl-C.

A small dataset in the bring-your-own format (data/FORMAT.md: three item modalities,
so DST gives the usual 6 codes) keeps it to minutes on two cores; everything else is what
``make run`` does on ML-100K: a tokenizer and an initial ranker trained, the broker, the
stream worker, Triton, the Rank server and the trainer started, the training period
backfilled, the test period replayed live, the report written, everything stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stream.testing import REPO_ROOT, WaitTimeout, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]

N_USERS, N_ITEMS, N_CLUSTERS = 60, 120, 4


def _dataset(root: Path, seed: int = 0) -> Path:
    """Users like the items of their own cluster: learnable, so the loop trains on something real."""
    rng = np.random.default_rng(seed)
    item_cluster = np.arange(N_ITEMS) % N_CLUSTERS
    user_cluster = rng.integers(0, N_CLUSTERS, N_USERS)
    rows, t = [], 1_600_000_000
    for _ in range(3000):
        u = int(rng.integers(N_USERS))
        i = int(rng.integers(N_ITEMS))
        like = (item_cluster[i] == user_cluster[u]) ^ (rng.random() < 0.15)
        t += int(rng.integers(1, 60))
        rows.append((f"u{u}", f"i{i}", 5.0 if like else 1.0, t))
    root.mkdir(parents=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).to_csv(
        root / "interactions.csv", index=False
    )
    pd.DataFrame({"item_id": [f"i{i}" for i in range(N_ITEMS)], "title": [f"item {i}" for i in range(N_ITEMS)]}).to_csv(
        root / "items.csv", index=False
    )
    (root / "item_embeddings").mkdir()
    centres = rng.normal(size=(N_CLUSTERS, 16))
    ids = np.array([f"i{i}" for i in range(N_ITEMS)], dtype=str)
    for modality, dim in (("text", 16), ("behaviour", 8), ("metadata", 8)):
        emb = centres[item_cluster][:, :dim] + 0.3 * rng.normal(size=(N_ITEMS, dim))
        np.savez(root / "item_embeddings" / f"{modality}.npz", ids=ids, embeddings=emb.astype(np.float32))
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loop")
    _dataset(root / "toy")
    return root


def _argv(ws: Path, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "hisam.cli", "run", "--dataset", str(ws / "toy"), "--data-dir", str(ws / "data"),
        "--artifacts", str(ws / "artifacts"), "--reports", str(ws / name / "reports"),
        "--work-dir", str(ws / name / "work"), "--no-progress", "--progress-every", "2", *extra,
    ]  # fmt: skip


def _leftovers(ws: Path, name: str) -> list[str]:
    """Processes still running whose command line names this run's work directory."""
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(ws / name / "work") in line and "ps -eww" not in line]


def _wait_gone(ws: Path, name: str, timeout_s: float = 15.0) -> None:
    """A stopped child's process group is SIGKILLed last and may linger a moment in ps."""
    try:
        wait_until(lambda: not _leftovers(ws, name), timeout_s, 0.2, "the loop's processes gone")
    except WaitTimeout:
        pass  # the assertion that follows names them


def test_the_whole_loop_runs_to_its_report(workspace) -> None:
    res = subprocess.run(
        _argv(workspace, "full", "--rate", "60", "--min-samples", "100", "--drain-timeout", "120"),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500, check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"},
    )  # fmt: skip
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-6000:])
    s = json.loads((workspace / "full" / "reports" / "run" / "summary.json").read_text())
    ev, rk, tr, fr = s["events"], s["rank"], s["trainer"], s["freshness_ms"]
    n_train = ev["backfill_actions"]
    assert ev["items_produced"] == N_ITEMS and n_train + ev["replay_actions"] == 3000
    assert ev["appended_committed"] == 3000 and ev["dead_letters"] == 0 and ev["stream_lag_left"] == 0
    assert fr["probes"] > 0 and fr["timeouts"] == 0 and fr["p99"] > 0
    assert rk["calls"] > 0 and rk["errors"] == 0 and rk["p50_ms"] > 0
    assert sum(rk["answered_by_version"].values()) == rk["calls"]
    assert tr["trained"] > 0 and tr["serving_version"] >= 1
    assert all(c["ok"] and c["scored"] > 0 for c in s["sample_calls"])
    report = (workspace / "full" / "reports" / "run" / "report.md").read_text()
    for heading in ("## Events", "## Near-line trainer", "## Rank", "timeline.png"):
        assert heading in report
    assert (workspace / "full" / "reports" / "run" / "timeline.png").stat().st_size > 10_000
    assert "report:" in res.stdout and "Rank p50" in res.stdout
    _wait_gone(workspace, "full")
    assert _leftovers(workspace, "full") == []
    # Every process's last /metrics page agrees with the report (infra/observability.py).
    prom = {
        n: _samples(workspace / "full" / "work" / "metrics" / f"{n}.prom")
        for n in ("stream-worker", "rank-server", "trainer")
    }
    assert prom["stream-worker"][("hisam_stream_actions_appended_total", ())] == 3000
    assert prom["stream-worker"][("hisam_stream_items_written_total", ())] == N_ITEMS
    ok = prom["rank-server"][("hisam_serving_rank_requests_total", (("code", "OK"),))]
    assert ok == rk["calls"] + len(s["sample_calls"])
    assert prom["trainer"][("hisam_trainer_samples_trained_total", ())] == tr["trained"]


def _samples(path: Path) -> dict[tuple[str, tuple], float]:
    from infra.observability import parse_metrics

    return parse_metrics(path.read_text())


def test_ctrl_c_stops_everything_and_still_reports(workspace) -> None:
    log = workspace / "interrupted.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _argv(workspace, "stopped", "--rate", "5"),
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while "replay " not in log.read_text() or "| stream" not in log.read_text():  # a progress line
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        assert _leftovers(workspace, "stopped"), "nothing of the loop is running before Ctrl-C"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, log.read_text()[-4000:]
    report = (workspace / "stopped" / "reports" / "run" / "report.md").read_text()
    assert "Interrupted" in report
    _wait_gone(workspace, "stopped")
    assert _leftovers(workspace, "stopped") == []
