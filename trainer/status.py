"""What ``hisam trainer status`` shows: the serving version, the rolling metrics and the lineage.

Read from files only (no broker, no Triton), so it works beside a running trainer or
without one: the live snapshot's state.json, lineage.jsonl (lineage.py) and the versions
present in the model repository.
"""

from __future__ import annotations

import json
from pathlib import Path

from serving.repository import published_versions
from trainer.lineage import STATE_JSON, StateDir
from trainer.prequential import Window


def status(state_dir: Path, repo: Path, n_lineage: int = 10) -> dict:
    """The trainer's state as one JSON-able dict; the last ``n_lineage`` lineage records, newest last."""
    sd = StateDir(state_dir)
    snap = sd.current()
    state = json.loads((snap / STATE_JSON).read_text()) if snap else {}
    out = {
        "state_dir": str(state_dir),
        "snapshot": str(snap) if snap else None,
        "repository_versions": {str(k): v for k, v in sorted(published_versions(repo).items())},
        "lineage": sd.lineage()[-n_lineage:],
    }
    if state:
        window = Window.from_dict(state["window"])
        out |= {
            "serving_version": state["serving_version"],
            "parent_version_on_probation": state["parent_version"],
            "trained": state["trained"],
            "optimizer_steps": state["steps"],
            "samples_since_publish": state["since_publish"],
            "offsets": state["offsets"],
            "counts": state["counts"],
            "window_rows": len(window),
            "window_metrics": window.metrics(),
        }
    return out
