#!/usr/bin/env bash
# One-command, idempotent set-up of orepa_mm's environment in .venv/.
#
# Installs torch (kept if .venv already has one, e.g. a CUDA build), mmcv 2.1.0
# with compiled ops (built from source when pip's cache has no wheel),
# mmengine, mmdet, mmsegmentation, openmim, the test tools and orepa_mm itself
# (editable).  A second run on a set-up machine only checks and exits.
#
# Environment knobs:
#   PYTHON      interpreter used to create .venv (default: python3)
#   TORCH_SPEC  pip requirement for torch when none is installed (default torch==2.13.0)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
STAMP="$VENV/.orepa_mm_setup"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

step=""
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "setup.sh: FAILED at step: ${step} (exit $rc)" >&2; fi' EXIT

log() { echo "[setup $(date +%H:%M:%S)] $*"; }

# The stamp records what was installed; it changes when these files change.
want_stamp() {
  cat "$ROOT/scripts/setup.sh" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1
}

step="check existing environment"
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(want_stamp)" ] \
   && "$PY" -c "import torch, mmcv.ops, mmengine, mmdet, mmseg, mim, orepa_mm" 2>/dev/null; then
  log "environment in .venv is up to date"
  exit 0
fi

step="create virtual environment"
if [ ! -x "$PY" ]; then
  log "creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi

step="install torch"
if "$PY" -c "import torch" 2>/dev/null; then
  log "keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  log "installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi

step="install build tools for mmcv"
# mmcv 2.1.0's setup.py imports pkg_resources (gone in setuptools>=70 for it),
# and mim needs pkg_resources too.
"${PIP[@]}" install -q 'setuptools<70' wheel ninja 'numpy>=1.24,<3'

step="install mmcv 2.1.0 with compiled ops"
if "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  log "mmcv 2.1.0 with ops already installed"
else
  log "installing mmcv==2.1.0 with ops (a cold build takes ~13 min on 2 cores; pip's wheel cache makes reruns fast)"
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" "${PIP[@]}" install --no-build-isolation mmcv==2.1.0
  "$PY" -c "import mmcv.ops" || { echo "mmcv installed but mmcv.ops does not import" >&2; exit 1; }
fi

step="install OpenMMLab frameworks and tools"
"${PIP[@]}" install -q mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 openmim==0.3.9 \
  ftfy regex 'setuptools<70'

step="install orepa_mm (editable) with test extras"
"${PIP[@]}" install -q --no-build-isolation -e "$ROOT[tests]"

step="verify imports"
"$PY" -c "import torch, mmcv, mmcv.ops, mmengine, mmdet, mmseg, mim, orepa_mm; print('torch', torch.__version__, '| mmcv', mmcv.__version__, '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__, '| orepa_mm', orepa_mm.__version__)"

want_stamp > "$STAMP"
log "done"
