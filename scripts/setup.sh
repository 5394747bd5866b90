#!/usr/bin/env bash
# One-command, idempotent set-up of orepa_mm's environment in .venv/.
#
# Installs torch (kept if .venv already has one, e.g. a CUDA build), mmcv with
# compiled ops (built from source when pip's cache has no wheel),
# mmengine, mmdet, mmsegmentation, openmim, the test tools and orepa_mm itself
# (editable).  A second run on a set-up machine only checks and exits.
#
# The exact versions come from requirements/constraints.txt (the one place
# they are written); the supported ranges from the other requirements files.
#
# Environment knobs:
#   PYTHON      interpreter used to create .venv (default: python3)
#   TORCH_SPEC  pip requirement for torch when none is installed (default: the constraints' pin)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
PIP=("$PY" -m pip --disable-pip-version-check)
STAMP="$VENV/.orepa_mm_setup"
pin() { grep -E "^$1==" "$CONSTRAINTS" | head -n 1; }
TORCH_SPEC="${TORCH_SPEC:-$(pin torch)}"
MMCV_SPEC="$(pin mmcv)"
MMCV_VERSION="${MMCV_SPEC#mmcv==}"

step=""
trap 'rc=$?; if [ $rc -ne 0 ]; then echo "setup.sh: FAILED at step: ${step} (exit $rc)" >&2; fi' EXIT

log() { echo "[setup $(date +%H:%M:%S)] $*"; }

# The stamp records what was installed; it changes when these files change.
want_stamp() {
  cat "$ROOT/scripts/setup.sh" "$ROOT/setup.py" "$ROOT"/requirements/*.txt | sha256sum | cut -d' ' -f1
}

step="check existing environment"
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(want_stamp)" ] \
   && "$PY" -c "import torch, mmcv.ops, mmengine, mmdet, mmseg, mim, orepa_mm" 2>/dev/null; then
  log "environment in .venv is up to date"
  exit 0
fi

step="create virtual environment"
if [ ! -x "$PY" ]; then
  BASE_PY="${PYTHON:-python3}"
  # A CUDA build of torch in the base interpreter is kept: the venv sees it.
  if "$BASE_PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    log "creating $VENV with the base interpreter's CUDA torch visible"
    "$BASE_PY" -m venv --system-site-packages "$VENV"
  else
    log "creating $VENV"
    "$BASE_PY" -m venv "$VENV"
  fi
fi

step="install torch"
if "$PY" -c "import torch" 2>/dev/null; then
  log "keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  log "installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi

step="install $MMCV_SPEC with compiled ops"
if "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null; then
  log "$MMCV_SPEC with ops already installed"
else
  # mmcv 2.1.0's setup.py needs an old setuptools (it imports pkg_resources
  # APIs); it builds without isolation against the installed torch.
  "${PIP[@]}" install -q 'setuptools<70' wheel ninja 'numpy>=1.24,<3'
  # On a CUDA machine build the ops for the local card only (all listed
  # architectures take far longer), with every core.
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c \
      "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}"
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    log "CUDA build of mmcv ops for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with MAX_JOBS=$MAX_JOBS"
  fi
  log "installing $MMCV_SPEC with ops (a cold build takes ~13 min on 2 cores; pip's wheel cache makes reruns fast)"
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" "${PIP[@]}" install --no-build-isolation "$MMCV_SPEC"
  "$PY" -c "import mmcv.ops" || { echo "mmcv installed but mmcv.ops does not import" >&2; exit 1; }
fi

# The pins without torch's: the torch already installed (maybe a CUDA build) stays.
PINS="$VENV/.orepa_mm_constraints"
grep -v -E '^torch==' "$CONSTRAINTS" > "$PINS"

# From here on: torch 2.13 asks for setuptools>=77.0.3, while mim imports
# pkg_resources, which setuptools 82 removed.
SETUPTOOLS='setuptools>=77.0.3,<82'

step="install OpenMMLab frameworks and tools"
"${PIP[@]}" install -q -c "$PINS" mmengine mmdet mmsegmentation openmim ftfy regex "$SETUPTOOLS"

step="install orepa_mm (editable) with test extras"
"${PIP[@]}" install -q --no-build-isolation -c "$PINS" -e "$ROOT[all]" "$SETUPTOOLS"

step="verify imports"
"$PY" -c "import torch, mmcv, mmcv.ops, mmengine, mmdet, mmseg, mim, orepa_mm; print('torch', torch.__version__, '| mmcv', mmcv.__version__, '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__, '| orepa_mm', orepa_mm.__version__)"

want_stamp > "$STAMP"
log "done"
