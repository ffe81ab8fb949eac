"""Running the GPU check's steps: sizes, the context they share, time budgets, skips."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sizes:
    """How big each step's work is; ``QUICK`` is the CPU smoke."""

    tokenizer_items: int = 2000
    tokenizer_epochs: int = 10
    preset: str = "small"
    history: int = 300
    train_batch: int = 32
    train_steps: int = 3
    bench_candidates: int = 500
    bench_reps: int = 5
    eval_users: int = 128
    eval_parity_users: int = 16
    trainer_samples: int = 2048
    micro_batch: int = 256
    trainer_small_trunk: bool = True  # besides the tests' tiny model


QUICK = Sizes(
    tokenizer_items=60,
    tokenizer_epochs=1,
    preset="cpu",
    history=8,
    train_batch=2,
    train_steps=1,
    bench_candidates=4,
    bench_reps=1,
    eval_users=3,
    eval_parity_users=2,
    trainer_samples=64,
    micro_batch=32,
    trainer_small_trunk=False,
)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    quick: bool
    out: Path
    partial: dict[str, Any] = field(default_factory=dict)  # a step's figures so far: kept if it fails later


class Skip(Exception):
    """A step that cannot run here; the message says why."""


class StepTimeout(Exception):
    """A step ran past its budget."""


# --- Running steps --------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``StepTimeout`` in the block after ``seconds`` (main thread only; elsewhere no limit)."""
    if seconds <= 0:
        raise StepTimeout("no time left in the run's budget")
    try:
        previous = signal.signal(signal.SIGALRM, _alarm)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _alarm(signum, frame) -> None:
    raise StepTimeout("ran past its time budget")


def _caused_by_timeout(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, StepTimeout):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def importable(module: str) -> bool:
    """Whether ``module`` can be found (a dotted name whose parent package is missing cannot).

    A module already imported counts even when its ``__spec__`` is None (``find_spec`` raises
    ValueError for those; faust ends up so after some imports in the same process).
    """
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def run_step(fn: Callable[[Context], dict], needs: tuple[str, ...], budget: float, ctx: Context) -> dict:
    """One step's record: status, seconds, budget and figures, or why it did not run."""
    missing = [m for m in needs if not importable(m)]
    if missing:
        return {"status": "skipped", "reason": f"not importable: {', '.join(missing)}", "seconds": 0.0}
    record: dict[str, Any] = {"budget_s": round(budget, 1)}
    ctx.partial = {}
    t0 = time.perf_counter()
    try:
        with time_limit(budget):
            record |= {"status": "ok", "figures": {**ctx.partial, **fn(ctx)}}
    except Skip as e:
        record |= {"status": "skipped", "reason": str(e)}
    except ModuleNotFoundError as e:
        record |= {"status": "skipped", "reason": f"not importable: {e.name} ({e})"}
    except StepTimeout as e:
        record |= {"status": "timeout", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - one step's failure must not lose the others
        if _caused_by_timeout(e):  # a library that wraps what it catches (the ONNX exporter does)
            record |= {"status": "timeout", "error": f"ran past its time budget inside {type(e).__name__}"}
        else:
            record |= {"status": "failed", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    if record["status"] != "ok" and ctx.partial:
        record["figures"] = ctx.partial
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record
