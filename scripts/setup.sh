#!/usr/bin/env bash
# Create .venv and install hisam with everything it needs, on a fresh machine.
# Idempotent: a second run only checks. Torch goes in first, pinned, so that pip never
# pulls a multi-GB CUDA build where there is no GPU (see docs/operations.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${HISAM_VENV:-.venv}
TORCH_VERSION=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" "torch==$TORCH_VERSION"                       # CUDA build from PyPI
  else
    # CPU build: PyTorch's CPU index where reachable, else whatever PyPI (or a local
    # wheel mirror) serves for this pin.
    "${PIP[@]}" --index-url https://download.pytorch.org/whl/cpu --timeout 10 --retries 0 "torch==$TORCH_VERSION" 2>/dev/null \
      || "${PIP[@]}" "torch==$TORCH_VERSION"
  fi
fi

stamp="$VENV/.hisam-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "${PIP[@]}" -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip check
  touch "$stamp"
fi
# A real Triton (2.51, CPU, Python backend) under .triton/, beside the venv, not in it
# (its Python backend needs numpy 1.x; scripts/install_triton.sh says why).
HISAM_VENV="$VENV" bash scripts/install_triton.sh >/dev/null
"$VENV/bin/python" -m hisam.cli codegen >/dev/null
# stunnel (Debian's stunnel4, unpacked under .tools/): the TLS terminator of the Kafka TLS tests.
# Not fatal here: without it only those tests fail, with the reason.
bash scripts/install_stunnel.sh >/dev/null \
  || echo "stunnel could not be installed: the Kafka TLS tests will fail (scripts/install_stunnel.sh)" >&2
# Redis for the production-store tests and the Redis path (the broker comes from PyPI).
command -v redis-server >/dev/null 2>&1 || bash scripts/services.sh install
echo "hisam environment ready in $VENV"
