#!/usr/bin/env bash
# Run the whole test suite on the embedded defaults. Services that tests need (the
# Kafka-compatible broker, Redis, Triton) are started by the test fixtures on free
# 127.0.0.1 ports with their data in temporary directories, and stopped afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$#" -eq 0 ]; then  # the whole suite (CI): style and layout first, they fail in seconds
  .venv/bin/ruff check --quiet .
  .venv/bin/ruff format --check --quiet .
  .venv/bin/python scripts/check_layout.py  # docs/design.md, "Layout"
fi
# The whole suite: the 25 slowest tests printed for CI; the CUDA-only tests (marker gpu) deselected,
# scripts/gpu_check.sh runs them on a GPU machine (its step gpu_tests).
if [ "$#" -eq 0 ]; then set -- --durations=25 -m "not gpu"; fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
