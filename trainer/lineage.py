"""The trainer's durable state: atomic snapshots, the weights of its versions, and the lineage.

The lineage is the append-only record of what the trainer decided and why: every publish
(its parent, the offsets it had trained on, the gate's statistics, the export checks, the
latency), refusal, probation verdict and rollback. The snapshots are what a restart resumes
from (nearline.py's ``state_dict``).

Layout of a state directory::

    CURRENT                       name of the live snapshot (replaced atomically)
    snapshots/<seq>/              candidate weights (checkpoint layout of recipes/ranker/train.py),
                                  optimizer.pt (AdamW moments, RNG: tensors and plain containers only,
                                  loaded with ``weights_only=True``), state.json (offsets consumed
                                  per partition, counters, rolling windows, seen event ids, ...)
    versions/<content version>/   weights of every version this trainer published or adopted (hmat-<hash>)
    lineage.jsonl                 one JSON record per publish, refusal, verdict, rollback (append-only)

A snapshot is written into ``snapshots/.tmp-<seq>``, every file fsynced, renamed to
``snapshots/<seq>`` and only then named by ``CURRENT`` (written to a temporary file, fsynced,
``os.replace``d, directory fsynced). A crash at any point leaves the previous snapshot
live and intact. The service commits Kafka offsets only after ``save`` returns, so the
committed offsets never run ahead of the state they describe; on restart the offsets in
the snapshot win over the group's (they are never behind it).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from serving.repository import durable_rename, write_json_durable

CURRENT = "CURRENT"
STATE_JSON = "state.json"
OPTIMIZER = "optimizer.pt"
LINEAGE = "lineage.jsonl"
KEEP_SNAPSHOTS = 2


class UnsafeStateError(ValueError):
    """A state file that is not plain tensors and containers: loading it could run code, so it is refused."""


def load_tensors(path: str | Path) -> Any:
    """``torch.load`` of a state file with ``weights_only=True``: tensors, numbers, strings and containers only.

    Anyone who can write the state volume could otherwise make the trainer run code (a
    pickle). Every state file this project writes is of that kind (also those of earlier
    releases, which load unchanged); anything else is refused with ``UnsafeStateError``.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeStateError(
            f"refusing {path}: it holds objects other than tensors and plain containers, and loading it would "
            f"run code ({str(e).splitlines()[-1] if str(e) else type(e).__name__}); it was not written by hisam, "
            "or was tampered with: remove it (and start from a checkpoint) or restore it from a backup"
        ) from None


def write_json_atomic(path: Path, obj: Any) -> None:
    write_json_durable(path, obj)


class StateDir:
    """Snapshots, version weights and lineage of one trainer (module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.snapshots = self.root / "snapshots"
        self.versions = self.root / "versions"
        self.lineage_path = self.root / LINEAGE

    # --- snapshots ---------------------------------------------------------------------------

    def current(self) -> Path | None:
        pointer = self.root / CURRENT
        if not pointer.is_file():
            return None
        path = self.snapshots / pointer.read_text().strip()
        return path if (path / STATE_JSON).is_file() else None

    def save(self, write_weights, optimizer_state: dict, state: dict) -> Path:
        """Write a new snapshot; ``write_weights(dir)`` writes the model checkpoint into it."""
        self.snapshots.mkdir(parents=True, exist_ok=True)
        cur = self.current()
        seq = int(cur.name) + 1 if cur is not None else 1
        name = f"{seq:010d}"
        tmp = self.snapshots / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_weights(tmp)
        torch.save(optimizer_state, tmp / OPTIMIZER)
        (tmp / STATE_JSON).write_text(json.dumps(state))
        final = self.snapshots / name
        durable_rename(tmp, final)  # every file, the directory, then the rename
        (self.root / (CURRENT + ".tmp")).write_text(name + "\n")
        durable_rename(self.root / (CURRENT + ".tmp"), self.root / CURRENT, replace=True)
        for old in sorted(p for p in self.snapshots.iterdir() if p.name.isdigit())[:-KEEP_SNAPSHOTS]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.snapshots.glob(".tmp-*"):  # a crash's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def load(self) -> tuple[Path, dict, dict] | None:
        """(snapshot dir, state.json, optimizer state) of the live snapshot, or None."""
        cur = self.current()
        if cur is None:
            return None
        state = json.loads((cur / STATE_JSON).read_text())
        opt = load_tensors(cur / OPTIMIZER)  # weights_only: a planted pickle is refused
        return cur, state, opt

    # --- lineage -----------------------------------------------------------------------------

    def append_lineage(self, record: dict) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        record = {"time": time.time(), **record}
        with open(self.lineage_path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record

    def lineage(self) -> list[dict]:
        if not self.lineage_path.is_file():
            return []
        out = []
        for line in self.lineage_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
        return out
