#!/usr/bin/env bash
# One prepared GPU check (at most 8 minutes on one H100/H200): every GPU-specific step of
# hisam/bench/gpu/ (tokenizer training, ranker PT/SFT, bench ranker, grouped evaluation,
# ONNX export + parity, near-line trainer, the CUDA-only tests), each under its own time budget, then a table on
# stdout and $OUT/gpu_check.json (OUT defaults to ./gpu_check_out).
#
# For a machine with a Python that has PyTorch (CUDA) but not this project's environment:
# run from a copy of the source tree, no install, no network; steps whose packages do not
# import are skipped and say why. Options go to the module (e.g. --steps eval export,
# --quick --device cpu for a smoke on CPU); PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
export OUT PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# The module keeps to --budget-s (450 s); the timeout is the backstop for a step stuck in native code.
exec timeout --kill-after=10 470 "${PYTHON:-python3}" -m hisam.bench.gpu --out "$OUT" "$@"
