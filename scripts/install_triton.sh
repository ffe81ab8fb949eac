#!/usr/bin/env bash
# Install a real Triton Inference Server (2.51, CPU) with its Python backend under .triton/
# (gitignored), without touching the project's virtual environment.
#
# The only PyPI package that ships the server is nvidia-pytriton. It pins numpy<2, and
# its Python backend stub really needs numpy 1.x (with numpy 2 the stub's tensor <->
# ndarray conversion reads wrong strides and returns wrong data), while the project runs
# numpy 2. So:
#   .triton/pytriton-VERSION/   nvidia-pytriton unpacked with --no-deps (only its binaries are used)
#   .triton/stub-site/          what the stub imports: numpy<2 and the venv's onnxruntime, --no-deps
# infra/triton.py starts the server with the stub pointed at stub-site
# (HISAM_TRITON_PYTHONPATH) and this interpreter's libpython first on LD_LIBRARY_PATH.
# Idempotent: a second run only checks.
#
#   scripts/install_triton.sh             # install if missing
#   HISAM_TRITON_HOME=DIR scripts/...     # elsewhere (infra/triton.py reads the same variable)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HISAM_VENV:-.venv}
PY="$VENV/bin/python"
PYTRITON_VERSION=0.7.0
HOME_DIR=${HISAM_TRITON_HOME:-.triton}
TARGET="$HOME_DIR/pytriton-$PYTRITON_VERSION"
SERVER="$TARGET/pytriton/tritonserver"
STUB_SITE="$HOME_DIR/stub-site"
PIP=("$PY" -m pip install -q --disable-pip-version-check --no-deps)

quiet() {  # pip prints harmless warnings about unreachable local index mirrors
  "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}

PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
ORT_VERSION=$("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)')

if [ ! -x "$SERVER/bin/tritonserver" ]; then
  rm -rf "$TARGET.tmp"
  quiet "${PIP[@]}" --target "$TARGET.tmp" "nvidia-pytriton==$PYTRITON_VERSION"
  rm -rf "$TARGET"
  mv "$TARGET.tmp" "$TARGET"
fi
STUB="$SERVER/python_backend_stubs/$PYVER/triton_python_backend_stub"
if [ ! -x "$STUB" ]; then
  echo "nvidia-pytriton $PYTRITON_VERSION has no Python backend stub for Python $PYVER" >&2
  exit 1
fi
# The server looks for the stub next to libtriton_python.so.
cp -f "$STUB" "$SERVER/backends/python/triton_python_backend_stub"

stamp="$STUB_SITE/.onnxruntime-$ORT_VERSION"
if [ ! -f "$stamp" ]; then
  rm -rf "$STUB_SITE.tmp"
  quiet "${PIP[@]}" --target "$STUB_SITE.tmp" "numpy>=1.26,<2" "onnxruntime==$ORT_VERSION"
  touch "$STUB_SITE.tmp/.onnxruntime-$ORT_VERSION"
  rm -rf "$STUB_SITE"
  mv "$STUB_SITE.tmp" "$STUB_SITE"
fi
echo "tritonserver ready: $SERVER/bin/tritonserver (stub packages in $STUB_SITE)"
