"""The loop's report: ``summary.json`` (the figures as plain values), ``timeline.png`` and ``report.md``.

Written from whatever the run holds, so an interrupted or failed loop still reports what
it measured up to that point.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

from hisam.run.state import Run
from serving.load import percentile


def summary_of(run: Run) -> dict:
    """The figures of a run as plain values (``summary.json``; the report's tables)."""
    import os
    import platform

    f = run.facts
    probe = run.probe
    calls = run.caller.calls if run.caller else []
    ok = [c["ms"] for c in calls if c["ok"]]
    versions: dict[str, int] = {}
    for c in calls:
        if c["ok"]:
            versions[c["model_version"]] = versions.get(c["model_version"], 0) + 1
    trainer = f.get("trainer", {})
    lineage = trainer.get("lineage", [])
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}",
        "interrupted": run.interrupted,
        "error": run.error,
        "options": {k: str(v) for k, v in vars(run.opts).items()},
        "stages_s": run.stages,
        "events": {
            "items_produced": f.get("items_produced"),
            "backfill_actions": f.get("backfill_actions"),
            "backfill_actions_per_s": f.get("backfill_actions_per_s"),
            "replay_actions": f.get("replay_actions"),
            "replay_s": f.get("replay_s"),
            "appended_committed": f.get("stream_appended"),
            "dead_letters": f.get("dead_letters"),
            "stream_lag_left": f.get("stream_lag_left"),
        },
        "freshness_ms": {
            "probes": len(probe.latencies_ms) if probe else 0,
            "timeouts": probe.timeouts if probe else 0,
            "p50": percentile(probe.latencies_ms, 50) if probe else None,
            "p99": percentile(probe.latencies_ms, 99) if probe else None,
        },
        "trainer": {
            "trained": trainer.get("trained"),
            "serving_version": trainer.get("serving_version"),
            "window_metrics": trainer.get("window_metrics"),
            "lag_left": f.get("trainer_lag_left"),
            "published": [
                {k: r.get(k) for k in ("version", "parent", "publish_latency_s", "model_version")}
                for r in lineage
                if r.get("event") == "published"
            ],
            "refused": sum(r.get("event") == "refused" for r in lineage),
            "rollbacks": sum(r.get("event") == "rollback" for r in lineage),
        },
        "rank": {
            "calls": len(calls),
            "errors": sum(not c["ok"] for c in calls),
            "error_examples": [c["error"] for c in calls if not c["ok"]][:5],
            "p50_ms": percentile(ok, 50),
            "p99_ms": percentile(ok, 99),
            "max_ms": max(ok) if ok else None,
            "answered_by_version": versions,
        },
        "sample_calls": f.get("sample_calls", []),
        "work_dir": str(run.work),
    }


def one_line(s: dict) -> str:
    """A summary's headline: what went through, what was published, how Rank answered."""
    ev, rk, tr = s["events"], s["rank"], s["trainer"]
    return (
        f"{(ev['backfill_actions'] or 0) + (ev['replay_actions'] or 0):,} actions ingested, "
        f"{len(tr['published'])} version(s) published, Rank p50 {rk['p50_ms']:.0f} ms / "
        f"p99 {rk['p99_ms']:.0f} ms over {rk['calls']} calls, {rk['errors']} errors"
    )


def _plot(run: Run, path: Path) -> Path | None:
    rows = run.timeline
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(12, 7.5))
    rates = [0.0] + [(b["appended"] - a["appended"]) / max(1e-9, b["t"] - a["t"]) for a, b in itertools.pairwise(rows)]
    ax[0, 0].plot(t, rates, label="appended / s")
    ax[0, 0].plot(t, [r["stream_lag"] for r in rows], label="stream lag (records)")
    ax[0, 0].set(title="Stream ingest", xlabel="replay time (s)")
    ax[0, 0].legend()
    ax[0, 1].plot(t, [r["fresh_p50_ms"] for r in rows], label="p50")
    ax[0, 1].plot(t, [r["fresh_p99_ms"] for r in rows], label="p99")
    ax[0, 1].set(title="Freshness: produce -> visible in the store", xlabel="replay time (s)", ylabel="ms")
    ax[0, 1].legend()
    calls = run.caller.calls if run.caller else []
    t0 = calls[0]["t"] if calls else 0.0
    by_version: dict[str, list] = {}
    for c in calls:
        if c["ok"]:
            by_version.setdefault(c["model_version"] or "?", []).append((c["t"] - t0, c["ms"]))
    for v, pts in sorted(by_version.items()):
        xs, ys = zip(*pts, strict=True)
        ax[1, 0].scatter(xs, ys, s=6, label=f"model {v}")
    errs = [c["t"] - t0 for c in calls if not c["ok"]]
    if errs:
        ax[1, 0].scatter(errs, [0] * len(errs), marker="x", color="red", label="error")
    ax[1, 0].set(title="Rank latency per call", xlabel="time (s)", ylabel="ms")
    ax[1, 0].legend(fontsize=7)
    models = sorted({m for r in rows for m in r["auc"]})
    for m in models:
        ax[1, 1].plot(t, [r["auc"].get(m) if r["auc"].get(m) is not None else math.nan for r in rows], label=m)
    ax[1, 1].set(title="Trainer: prequential AUC (rolling window)", xlabel="replay time (s)")
    if models:
        ax[1, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(x, fmt: str = "{:.1f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x) if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def write_report(run: Run, out_dir: Path) -> Path:
    """``report.md`` (tables), ``timeline.png`` and ``summary.json`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = summary_of(run)
    (out_dir / "summary.json").write_text(json.dumps(s, indent=1, default=str))
    (out_dir / "timeline.json").write_text(json.dumps(run.timeline, default=float))
    plot = _plot(run, out_dir / "timeline.png")
    ev, fr, tr, rk = s["events"], s["freshness_ms"], s["trainer"], s["rank"]
    lines = [
        "# hisam: the whole loop",
        "",
        (
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} on {s['machine']}; online store: {run.opts.backend}; "
            f"dataset: {run.opts.dataset}; work dir `{run.work}`."
        ),
    ]
    if run.interrupted:
        lines += ["", "**Interrupted (Ctrl-C): the figures cover the run up to that point.**"]
    if run.error:
        lines += ["", f"**Failed:** {run.error}"]
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in s["stages_s"].items()]
    lines += [
        "",
        "## Events",
        "",
        "| measure | value |",
        "|---|---|",
        f"| item events produced and tokenized | {_cell(ev['items_produced'])} |",
        f"| backfill actions (training period) | {_cell(ev['backfill_actions'])} |",
        f"| backfill ingest rate (actions/s, one worker) | {_cell(ev['backfill_actions_per_s'])} |",
        f"| replayed actions (test period) | {_cell(ev['replay_actions'])} in {_cell(ev['replay_s'])} s |",
        f"| actions committed by the stream worker | {_cell(ev['appended_committed'])} |",
        f"| dead letters | {_cell(ev['dead_letters'])} |",
        (
            f"| freshness p50 / p99 (produce -> visible in the store) | {_cell(fr['p50'])} / {_cell(fr['p99'])} ms "
            f"({fr['probes']} probes, {fr['timeouts']} timeouts) |"
        ),
        "",
        "## Near-line trainer",
        "",
        (
            f"Trained on {_cell(tr['trained'])} samples; serving version {_cell(tr['serving_version'])}; "
            f"{len(tr['published'])} version(s) published, {tr['refused']} refused by the gate, "
            f"{tr['rollbacks']} rollback(s); samples left unconsumed at the end: {_cell(tr['lag_left'])}."
        ),
        "",
        "| version | parent | publish latency (s) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {p['version']} | {_cell(p['parent'])} | {_cell(p['publish_latency_s'], '{:.2f}')} |"
        for p in tr["published"]
    ] or ["| - | - | - |"]
    wm = tr.get("window_metrics") or {}
    if wm:
        lines += ["", "| model (prequential, rolling window) | AUC | GAUC | n |", "|---|---|---|---|"]
        lines += [
            f"| {m} | {_cell(v.get('auc'), '{:.4f}')} | {_cell(v.get('gauc'), '{:.4f}')} | {_cell(v.get('n'))} |"
            for m, v in sorted(wm.items())
        ]
    lines += [
        "",
        "## Rank",
        "",
        (
            f"{rk['calls']} calls during the replay ({run.opts.candidates} candidates each), {rk['errors']} errors; "
            f"latency p50 {_cell(rk['p50_ms'])} ms, p99 {_cell(rk['p99_ms'])} ms, max {_cell(rk['max_ms'])} ms."
        ),
        "",
        "| answered by model version | calls |",
        "|---|---|",
    ]
    lines += [f"| {v or '-'} | {n} |" for v, n in sorted(rk["answered_by_version"].items())] or ["| - | 0 |"]
    if rk["error_examples"]:
        lines += ["", "Errors: " + "; ".join(rk["error_examples"])]
    if s["sample_calls"]:
        lines += ["", "Sample calls after the replay:", "", "| user | history | model | ms | top 5 (item, score) |"]
        lines += ["|---|---|---|---|---|"]
        for c in s["sample_calls"]:
            if c["ok"]:
                top = ", ".join(f"{i} ({sc:.3f})" for i, sc in c["top"])
                lines.append(f"| {c['user']} | {c['history_len']} | {c['model_version']} | {c['ms']:.0f} | {top} |")
            else:
                lines.append(f"| {c['user']} | - | - | {c['ms']:.0f} | {c['error']} |")
    if plot:
        lines += ["", f"![timeline]({plot.name})"]
    lines += [
        "",
        f"Process logs: `{run.work / 'logs'}`; each process's last Prometheus page: `{run.work / 'metrics'}`.",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
