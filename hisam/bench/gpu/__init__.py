"""``hisam bench gpu`` (scripts/gpu_check.sh): every GPU-specific check in one prepared run, one JSON.

Made for a GPU machine that has a Python with PyTorch but not this project's environment:
the source tree on ``PYTHONPATH``, no package index, no network, no services. Each step
first checks that what it needs imports, and is skipped with the reason otherwise (a
``ModuleNotFoundError`` inside a step skips it too, naming the module). Each step runs in
its own try block under its own time budget (``SIGALRM``; the run's ``--budget-s`` caps
the sum), and the JSON is rewritten after every step, so a failure, a hang or a kill
loses one step at most. Steps:

- ``env``: Python, torch, CUDA, the device, which optional packages import;
- ``tokenizer``: DST training smoke on the device (synthetic items of
  recipes/tokenizer/testing.py, no dataset), and k-means++ on device data with a CPU
  generator (the crash of ``--device cuda`` before quantize.py drew where the generator lives);
- ``ranker_train``: the fp32 parity of HMAT's whole-stream attention paths (SDPA under the
  dense mask, structured, FlexAttention) with the reference at the preset's length, then PT and
  SFT steps (AdamW) of the flat transformer and of HMAT on each path under autocast (bf16 on
  CUDA): tokens/s and ``torch.cuda.max_memory_allocated``, and the fastest HMAT path over flat;
- ``bench_ranker``: ``hisam bench ranker --preset small`` on the device, by calling the
  bench (one-pass vs anchor-cached scoring, training, evaluation figures: its JSON);
- ``eval``: the stream-protocol evaluation grouped by user vs one stream per row
  (hisam/bench/ranker.py ``grouped_eval_speed``): rows/s under autocast, and the two
  paths' score / AUC / GAUC differences in fp32;
- ``export``: the three ONNX graphs (export/graphs.py) and their parity with PyTorch on
  ONNX Runtime's CUDA provider when it has one, else its CPU provider (``provider`` says
  which), besides the project's own CPU check (export/template.py ``check_parity``);
- ``trainer``: the near-line trainer's samples/s on the device (trainer/nearline.py
  ``NearlineTrainer``, its Kafka-free core: test-then-train micro-batches on synthetic
  samples of trainer/testing.py), for the tests' tiny model and the same with the Small trunk. It needs the generated ``hisam_pb`` modules: made with
  grpc_tools into ``<out>/codegen`` when missing, skipped when grpc_tools is missing too;
- ``gpu_tests``: the tests marked ``gpu`` (CUDA only: FlexAttention against the dense oracle,
  the model on every attention path, the tokenizer trained on CUDA), which the CPU suite
  deselects (scripts/test.sh), by ``pytest -m gpu`` in a child process.

Sizes: Small preset, T = 300, batch 32, N = 500 by default; ``--quick`` shrinks everything
(``--device cpu --quick`` runs in seconds, the export step skipped: tests/hisam/test_gpu_check.py). Output: a table
on stdout and ``<out>/gpu_check.json`` (``steps``: per step ``status`` ok / failed /
timeout / skipped, ``seconds``, ``budget_s``, ``figures``, and ``reason`` or ``error``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hisam.bench.gpu.runner import QUICK, Context, Sizes, run_step
from hisam.bench.gpu.steps import (
    step_bench_ranker,
    step_env,
    step_eval,
    step_export,
    step_gpu_tests,
    step_ranker_train,
    step_tokenizer,
    step_trainer,
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke of every step (CPU tests)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time budget (seconds)")
    parser.add_argument("--steps", nargs="+", help="run only these steps (default: all)")


STEPS: list[tuple[str, Callable[[Context], dict], tuple[str, ...], float]] = [
    ("env", step_env, (), 20),
    ("tokenizer", step_tokenizer, ("numpy",), 60),
    ("ranker_train", step_ranker_train, (), 150),
    ("bench_ranker", step_bench_ranker, (), 150),
    ("eval", step_eval, ("numpy",), 90),
    ("export", step_export, ("onnx", "onnxruntime", "onnxscript"), 150),
    ("trainer", step_trainer, ("numpy", "google.protobuf"), 60),
    ("gpu_tests", step_gpu_tests, ("pytest", "numpy"), 120),
]


# --- Output ---------------------------------------------------------------------------------


def table(result: dict) -> str:
    rows = [f"{'step':<14}{'status':<9}{'seconds':>8}  figures"]
    for name, r in result["steps"].items():
        note = r.get("figures", {}).get("headline") or r.get("reason") or r.get("error", "")
        rows.append(f"{name:<14}{r['status']:<9}{r['seconds']:>8.1f}  {str(note).splitlines()[0][:140]}")
    return "\n".join(rows)


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = Context(device, QUICK if args.quick else Sizes(), args.quick, Path(args.out))
    ctx.out.mkdir(parents=True, exist_ok=True)
    path = ctx.out / "gpu_check.json"
    wanted = args.steps or [name for name, *_ in STEPS]
    unknown = set(wanted) - {name for name, *_ in STEPS}
    if unknown:
        log.error("unknown steps %s; the steps are %s", sorted(unknown), [name for name, *_ in STEPS])
        return 2
    result: dict[str, Any] = {"device": str(device), "quick": args.quick, "budget_s": args.budget_s, "steps": {}}
    result["sizes"] = dataclasses.asdict(ctx.sizes)
    start = time.perf_counter()
    for name, fn, needs, budget in STEPS:
        if name not in wanted:
            continue
        left = args.budget_s - (time.perf_counter() - start)
        log.info("step %s (budget %.0f s)", name, min(budget, left))
        result["steps"][name] = run_step(fn, needs, min(budget, left), ctx)
        result["seconds"] = round(time.perf_counter() - start, 1)
        path.write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    print(f"wrote {path}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in result["steps"].values()) else 1
