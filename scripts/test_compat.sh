#!/usr/bin/env bash
# The compatibility jobs: orepa_mm's library tests at the ends of the supported ranges.
#
#   scripts/test_compat.sh [oldest|numpy2] [pytest args...]
#
#   oldest  (default) requirements/compat.txt in .venv-compat: Python 3.8,
#           torch 2.1.2, numpy 1.24, mmengine 0.10.0, mmcv-lite 2.1.0.
#   numpy2  requirements/compat-numpy2.txt in .venv-compat-numpy2: Python 3.12,
#           numpy 2.x, the oldest torch that runs with numpy 2 there, mmcv-lite.
#
# Each environment is made from its requirements file (whose first line names
# its Python, `# python: X.Y`), orepa_mm is installed into it without
# dependencies, and the test files marked core run (`pytest --core`: kernels,
# layers, batched generation, kernel cache, fuse, dtypes, checkpoint I/O and
# safety).  Fails if no test was collected.
#
# Environment knobs:
#   COMPAT_PYTHON  interpreter for the environment (default: pyenv's newest X.Y, else pythonX.Y)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOB="oldest"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then JOB="$1"; shift; fi
case "$JOB" in
  oldest) REQS="$ROOT/requirements/compat.txt"; VENV="$ROOT/.venv-compat" ;;
  numpy2) REQS="$ROOT/requirements/compat-numpy2.txt"; VENV="$ROOT/.venv-compat-numpy2" ;;
  *) echo "test_compat.sh: unknown job '$JOB' (oldest or numpy2)" >&2; exit 2 ;;
esac
PY="$VENV/bin/python"
STAMP="$VENV/.orepa_mm_compat"
WANT_PY="$(sed -n 's/^# python: *\([0-9.]*\).*/\1/p' "$REQS" | head -n 1)"
log() { echo "[compat:$JOB $(date +%H:%M:%S)] $*"; }

find_python() {
  if [ -n "${COMPAT_PYTHON:-}" ]; then echo "$COMPAT_PYTHON"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v="$(pyenv versions --bare 2>/dev/null | grep -E "^${WANT_PY//./\\.}\.[0-9]+$" | sort -t. -k3 -n | tail -n 1 || true)"
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python"; return; fi
  fi
  command -v "python$WANT_PY" || { echo "test_compat.sh: no Python $WANT_PY found (set COMPAT_PYTHON)" >&2; exit 1; }
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
"$PY" -c "import sys, numpy, torch, mmengine, mmcv, orepa_mm; print('compat stack ($JOB): Python', sys.version.split()[0], '| numpy', numpy.__version__, '| torch', torch.__version__, '| mmengine', mmengine.__version__, '| mmcv(-lite)', mmcv.__version__, '| orepa_mm', orepa_mm.__version__)"

cd "$ROOT"
# pytest exits 5 when nothing was collected: the job fails then too.
"$PY" -m pytest tests --core -q -ra -p no:cacheprovider "$@"
