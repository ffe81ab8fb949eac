"""The loop's measurements and report (hisam/run/probes.py, hisam/run/report.py) on a run built by hand.

What the whole loop (test_run_loop.py) checks end to end, here in a second: the figures
of summary.json from the Rank calls and the timeline, the report's sections, and the
requests a front end would send.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np

from hisam.run.probes import RecentUsers, last_users_requests, progress_line
from hisam.run.report import one_line, summary_of, write_report
from hisam.run.state import LoopOptions, Run
from serving.load import percentile


def _call(t: float, ms: float, version: str = "", error: str = "") -> dict:
    if error:
        return {"t": t, "user": 1, "ok": False, "ms": ms, "error": error}
    top = [(7, 0.9), (3, 0.5)]
    return {"t": t, "user": 1, "ok": True, "ms": ms, "model_version": version, "history_len": 4, "top": top}


def _row(t: float, appended: int, auc: float | None) -> dict:
    return {
        "t": t, "produced": appended, "total": 100, "appended": appended, "stream_lag": 3, "dead_letters": 0,
        "fresh_p50_ms": 12.0, "fresh_p99_ms": 40.0, "rank_calls": 2, "rank_errors": 0, "rank_p50_ms": 20.0,
        "rank_p99_ms": 30.0, "rank_version": "v1", "trained": 50, "serving_version": 1, "published": 0,
        "auc": {"nearline": auc}, "gauc": {"nearline": auc},
    }  # fmt: skip


def _run(tmp_path) -> Run:
    run = Run(LoopOptions(), tmp_path / "work")
    run.stages = {"dataset": 1.0, "replay": 10.0}
    run.facts |= {"backfill_actions": 900, "replay_actions": 100, "items_produced": 40}
    published = {"event": "published", "version": 2, "parent": 1, "publish_latency_s": 3.5}
    run.facts["trainer"] = {"trained": 50, "serving_version": 2, "lineage": [published, {"event": "refused"}]}
    calls = [_call(0.0, 10.0, "v1"), _call(1.0, 30.0, "v2"), _call(2.0, 50.0, "v2"), _call(3.0, 5.0, error="X: y")]
    run.caller = SimpleNamespace(calls=calls)
    run.timeline = [_row(0.0, 0, None), _row(5.0, 50, 0.6), _row(10.0, 100, 0.7)]
    return run


def test_the_summary_counts_every_rank_call_by_the_version_that_answered(tmp_path) -> None:
    s = summary_of(_run(tmp_path))
    rk, tr, fr = s["rank"], s["trainer"], s["freshness_ms"]
    assert (rk["calls"], rk["errors"], rk["error_examples"]) == (4, 1, ["X: y"])
    assert rk["answered_by_version"] == {"v1": 1, "v2": 2}
    assert rk["p50_ms"] == 30.0 and rk["max_ms"] == 50.0
    assert [p["version"] for p in tr["published"]] == [2] and tr["refused"] == 1 and tr["rollbacks"] == 0
    assert fr["probes"] == 0 and fr["p50"] is None  # no freshness probe ran
    assert one_line(s).startswith("1,000 actions ingested, 1 version(s) published, Rank p50 30 ms")


def test_the_report_has_its_sections_plots_and_the_interruption(tmp_path) -> None:
    run = _run(tmp_path)
    run.interrupted = True
    path = write_report(run, tmp_path / "report")
    report = path.read_text()
    for part in ("## Stages", "## Events", "## Near-line trainer", "## Rank", "| v2 | 2 |", "Interrupted"):
        assert part in report
    assert "![timeline](timeline.png)" in report and (tmp_path / "report" / "timeline.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["interrupted"] is True
    assert len(json.loads((tmp_path / "report" / "timeline.json").read_text())) == 3


def test_a_run_that_measured_nothing_still_reports(tmp_path) -> None:
    run = Run(LoopOptions(), tmp_path / "work", error="RuntimeError: no broker")
    report = write_report(run, tmp_path / "report").read_text()
    assert "**Failed:** RuntimeError: no broker" in report and "timeline.png" not in report
    assert summary_of(run)["rank"]["calls"] == 0 and math.isnan(summary_of(run)["rank"]["p50_ms"])


def test_progress_line_shows_the_ingest_rate_since_the_last_row() -> None:
    first, second = _row(5.0, 50, 0.6), _row(10.0, 100, 0.7)
    line = progress_line(second, first)
    assert line.startswith("replay 100/100 | stream 100 appended (10/s)") and "AUC nearline 0.700" in line
    assert "fresh p50/p99 12/40 ms" in progress_line(_row(1.0, 0, None), None)


def test_rank_requests_are_for_users_the_replay_has_seen() -> None:
    items = np.arange(100, 120)
    users = RecentUsers(items, candidates=5, seed=0)
    assert users() is None  # nothing replayed yet: no call
    for u in (4, 8):
        users.seen(u)
    for _ in range(20):
        user, candidates = users()
        assert user in (4, 8) and len(set(candidates)) == 5 and set(candidates) <= set(items.tolist())
    replayed = np.array([1, 2, 1, 3, 2, 5])
    assert last_users_requests(replayed, items, k=3) == [
        (5, [100, 101, 102]),
        (2, [100, 101, 102]),
        (3, [100, 101, 102]),
    ]


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50)) and percentile([1.0, 2.0, 3.0], 50) == 2.0
