"""``hisam trainer status``: serving version, candidate metrics and lineage, from the state dir and repository.

Reads files only (trainer/status.py). ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=Path("artifacts/trainer"))
    parser.add_argument("--model-repo", type=Path, default=Path("artifacts/model_repo"))
    parser.add_argument("--lineage", type=int, default=10, help="lineage records to show (newest last)")
    parser.add_argument("--json", action="store_true")


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def main(args: argparse.Namespace) -> int:
    from trainer.status import status

    s = status(args.state_dir, args.model_repo, args.lineage)
    if args.json:
        print(json.dumps(s, indent=1, default=str))
        return 0
    print(f"state: {s['snapshot'] or 'none'}")
    print(f"repository {args.model_repo}: versions {s['repository_versions'] or 'none'}")
    if "serving_version" in s:
        print(f"serving version: {s['serving_version']} (parent on probation: {s['parent_version_on_probation']})")
        print(
            f"trained: {s['trained']} samples, {s['optimizer_steps']} steps; since last publish: {s['samples_since_publish']}"
        )
        print(f"offsets: {s['offsets']}")
        print(f"counts: {s['counts']}")
        print(f"rolling window ({s['window_rows']} rows):")
        for m, v in s["window_metrics"].items():
            print(f"  {m:10s} AUC {_fmt(v['auc'])}  GAUC {_fmt(v['gauc'])}")
    print("lineage:")
    for r in s["lineage"]:
        keys = ("event", "version", "parent", "to", "reason", "model_version", "publish_latency_s")
        line = ", ".join(f"{k}={r[k]}" for k in keys if r.get(k) is not None)
        stats = (r.get("gate") or r.get("metrics") or {}).get("paired")  # the decision's paired test
        if stats:
            line += f", D={_fmt(stats['diff'])} (bounds {_fmt(stats['lower'])}..{_fmt(stats['upper'])})"
        print("  " + line)
    return 0
