#!/usr/bin/env bash
# The users'-stack job: the whole suite on the stack mmdet 3.x users run.
#
# 1. Builds .venv-users (Python 3.10) the way such an environment exists
#    before orepa_mm arrives: torch 2.1.2 + torchvision 0.16.2, numpy 1.26,
#    mmcv 2.1.0 with compiled ops (built from source against that torch once;
#    afterwards pip's wheel cache has it), mmengine, mmdet, mmseg, mmpretrain,
#    openmim (requirements/users.txt), plus the test tools.
# 2. Adds orepa_mm exactly as the README's "Install into an existing mmdet /
#    mmseg environment" says (`pip install -e .`), and fails if that moved any
#    other package.
# 3. Runs the whole suite (`pytest tests`, every marker) with that interpreter.
#
# Environment knobs:
#   USERS_PYTHON  interpreter for .venv-users (default: pyenv's newest 3.10, else python3.10)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-users"
PY="$VENV/bin/python"
STACK="$ROOT/requirements/users.txt"
PIP=("$PY" -m pip --disable-pip-version-check)
STAMP="$VENV/.orepa_mm_users"
log() { echo "[users $(date +%H:%M:%S)] $*"; }
pin() { grep -E "^$1==" "$STACK" | head -n 1; }

find_python() {
  if [ -n "${USERS_PYTHON:-}" ]; then echo "$USERS_PYTHON"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.10\.[0-9]+$' | sort -t. -k3 -n | tail -n 1 || true)"
    if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python"; return; fi
  fi
  command -v python3.10 || { echo "test_users_stack.sh: no Python 3.10 found (set USERS_PYTHON)" >&2; exit 1; }
}

want_stamp() {
  cat "$STACK" "$ROOT/requirements/tests.txt" "$ROOT/requirements/deploy.txt" "$ROOT/scripts/test_users_stack.sh" \
    | sha256sum | cut -d' ' -f1
}

if [ ! -x "$PY" ] || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$(want_stamp)" ]; then
  BASE="$(find_python)"
  log "creating $VENV with $("$BASE" --version 2>&1)"
  rm -rf "$VENV"
  "$BASE" -m venv "$VENV"
  # The index's torch 2.1.2 (a CUDA 12.1 build that runs on the CPU) and its torchvision.
  log "installing $(pin torch), $(pin torchvision), $(pin numpy)"
  "${PIP[@]}" install -q "$(pin torch)" "$(pin torchvision)" "$(pin numpy)"
  # mmcv 2.1.0's setup.py imports pkg_resources: an old setuptools, no build isolation.
  "${PIP[@]}" install -q 'setuptools<70' wheel ninja
  log "installing $(pin mmcv) with ops (a cold build takes ~13 min on 2 cores; pip's wheel cache makes reruns fast)"
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" "${PIP[@]}" install -q --no-build-isolation -c "$STACK" "$(pin mmcv)"
  log "installing the frameworks and the test tools"
  "${PIP[@]}" install -q -c "$STACK" mmengine mmdet mmsegmentation mmpretrain openmim ftfy regex \
    -r "$ROOT/requirements/tests.txt" -r "$ROOT/requirements/deploy.txt"
  # mmdeploy as a user adds it: without its protobuf pin (requirements/deploy.txt says why).
  "${PIP[@]}" install -q --no-deps -c "$STACK" mmdeploy
  "$PY" -c "import mmcv.ops" || { echo "test_users_stack.sh: mmcv.ops does not import" >&2; exit 1; }
  want_stamp > "$STAMP"
fi

# The README's install command, on top of the stack; nothing else may move.
BEFORE="$(mktemp)"; AFTER="$(mktemp)"
"${PIP[@]}" freeze --exclude-editable | grep -v -i '^orepa.mm' | sort > "$BEFORE"
(cd "$ROOT" && "${PIP[@]}" install -q -e .)
"${PIP[@]}" freeze --exclude-editable | grep -v -i '^orepa.mm' | sort > "$AFTER"
if ! diff -u "$BEFORE" "$AFTER"; then
  echo "test_users_stack.sh: 'pip install -e .' changed the packages above in the users' stack" >&2
  exit 1
fi
rm -f "$BEFORE" "$AFTER"
"$PY" -c "import sys, numpy, torch, torchvision, mmcv, mmcv.ops, mmengine, mmdet, mmseg, mmpretrain, orepa_mm; print('users stack: Python', sys.version.split()[0], '| numpy', numpy.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| mmcv', mmcv.__version__, '| mmengine', mmengine.__version__, '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__, '| mmpretrain', mmpretrain.__version__, '| orepa_mm', orepa_mm.__version__)"

cd "$ROOT"
"$PY" -m pytest tests -q -ra -p no:cacheprovider "$@"
