#!/usr/bin/env bash
# The compatibility job: orepa_mm's library tests on the oldest supported stack.
#
# Creates .venv-compat with Python 3.8 and requirements/compat.txt (torch
# 2.1.2, mmengine 0.10.0, mmcv-lite 2.1.0: no compiled ops, no mmdet/mmseg),
# installs orepa_mm into it without dependencies, and runs the test files
# marked core (`pytest --core`: kernels, layers, batched generation, fuse,
# dtypes, checkpoint I/O and safety).  Fails if no test was collected.
#
# Environment knobs:
#   COMPAT_PYTHON  interpreter for .venv-compat (default: pyenv's newest 3.8, else python3.8)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-compat"
PY="$VENV/bin/python"
REQS="$ROOT/requirements/compat.txt"
STAMP="$VENV/.orepa_mm_compat"
log() { echo "[compat $(date +%H:%M:%S)] $*"; }

find_python() {
  if [ -n "${COMPAT_PYTHON:-}" ]; then echo "$COMPAT_PYTHON"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.8\.[0-9]+$' | sort -t. -k3 -n | tail -n 1 || true)"
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python"; return; fi
  fi
  command -v python3.8 || { echo "test_compat.sh: no Python 3.8 found (set COMPAT_PYTHON)" >&2; exit 1; }
}

want_stamp() { cat "$REQS" "$ROOT/scripts/test_compat.sh" | sha256sum | cut -d' ' -f1; }

if [ ! -x "$PY" ] || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$(want_stamp)" ]; then
  BASE="$(find_python)"
  log "creating $VENV with $("$BASE" --version 2>&1)"
  rm -rf "$VENV"
  "$BASE" -m venv "$VENV"
  log "installing $(grep -v '^#' "$REQS" | tr '\n' ' ')"
  "$PY" -m pip install -q --disable-pip-version-check -r "$REQS"
  want_stamp > "$STAMP"
fi
# Editable and without dependencies: the stack above is the one under test.
"$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null \
  || "$PY" -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT"
"$PY" -c "import sys, torch, mmengine, mmcv, orepa_mm; print('compat stack: Python', sys.version.split()[0], '| torch', torch.__version__, '| mmengine', mmengine.__version__, '| mmcv(-lite)', mmcv.__version__, '| orepa_mm', orepa_mm.__version__)"

cd "$ROOT"
# pytest exits 5 when nothing was collected: the job fails then too.
"$PY" -m pytest tests --core -q -ra -p no:cacheprovider "$@"
