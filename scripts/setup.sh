#!/usr/bin/env bash
# One-command, idempotent set-up of orepa_mm's environment in .venv/.
#
# Installs torch and torchvision (kept if .venv already has a working pair,
# e.g. a CUDA build), mmcv with compiled ops (built from source when pip's
# cache has no wheel), mmengine, mmdet, mmsegmentation, mmpretrain, openmim,
# the test tools and orepa_mm itself (editable).  A second run on a set-up
# machine only checks and exits.
#
# The exact versions come from requirements/constraints.txt (the one place
# they are written); the supported ranges from the other requirements files.
#
# Environment knobs:
#   PYTHON      interpreter used to create .venv (default: python3)
#   VENV        the environment to set up (default: .venv in the repository)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
PIP=("$PY" -m pip --disable-pip-version-check)
STAMP="$VENV/.orepa_mm_setup"
pin() { grep -E "^$1==" "$CONSTRAINTS" | head -n 1; }
TORCH_SPEC="$(pin torch)"
TORCHVISION_SPEC="$(pin torchvision)"
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
   && "$PY" -c "import torch, torchvision, mmcv.ops, mmengine, mmdet, mmseg, mmpretrain, mim, mmdeploy, orepa_mm" 2>/dev/null; then
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

step="install torch and torchvision"
# mmpretrain imports torchvision, whose compiled ops must match torch's build.
# A working pair (a GPU user's CUDA torch and torchvision) is kept.  Otherwise
# the pinned pair is installed from the package index: a CPU-only torch file
# that pip finds through a local find-links folder has no torchvision built
# for it (the index's torchvision then fails at import with "operator
# torchvision::nms does not exist"), so find-links is pointed at an empty
# folder for this one install.  The index's x86_64 torch is a CUDA build
# (about 5 GB with its libraries) that runs on the CPU as well.
if "$PY" -c "import torch, torchvision" 2>/dev/null; then
  log "keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)') and torchvision $("$PY" -c 'import torchvision; print(torchvision.__version__)')"
elif "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null \
     && ! "$PY" -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_SPEC#torch==}'" 2>/dev/null; then
  echo "setup.sh: .venv has torch $("$PY" -c 'import torch; print(torch.__version__)') (a CUDA build, kept) but no" \
       "working torchvision; install the torchvision release made for that torch into .venv and rerun" >&2
  exit 1
else
  NO_LINKS="$(mktemp -d)"
  log "installing $TORCH_SPEC and $TORCHVISION_SPEC from the package index"
  "${PIP[@]}" uninstall -q -y torch torchvision 2>/dev/null || true
  PIP_FIND_LINKS="$NO_LINKS" "${PIP[@]}" install -q "$TORCH_SPEC" "$TORCHVISION_SPEC"
  rmdir "$NO_LINKS"
  "$PY" -c "import torchvision.ops" || { echo "torchvision installed but does not import" >&2; exit 1; }
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

# The pins without torch's and torchvision's: the pair installed above (maybe a user's CUDA build) stays.
PINS="$VENV/.orepa_mm_constraints"
grep -v -E '^(torch|torchvision)==' "$CONSTRAINTS" > "$PINS"

# From here on: torch 2.13 asks for setuptools>=77.0.3, while mim imports
# pkg_resources, which setuptools 82 removed.
SETUPTOOLS='setuptools>=77.0.3,<82'

step="install OpenMMLab frameworks and tools"
"${PIP[@]}" install -q -c "$PINS" mmengine mmdet mmsegmentation mmpretrain openmim ftfy regex "$SETUPTOOLS"

step="install orepa_mm (editable) with test extras"
"${PIP[@]}" install -q --no-build-isolation -c "$PINS" -e "$ROOT[all]" "$SETUPTOOLS"

step="install mmdeploy"
# Without its own requirements: they pin protobuf<=3.20.2, which onnx and
# onnxruntime do not run with and its ONNX Runtime path does not need; what
# it imports comes with the [deploy] extra (requirements/deploy.txt, in [all]).
"${PIP[@]}" install -q --no-deps -c "$PINS" mmdeploy

step="verify imports"
"$PY" -c "import torch, torchvision, mmcv, mmcv.ops, mmengine, mmdet, mmseg, mmpretrain, mim, mmdeploy.apis, orepa_mm; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| mmcv', mmcv.__version__, '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__, '| mmpretrain', mmpretrain.__version__, '| orepa_mm', orepa_mm.__version__)"

want_stamp > "$STAMP"
log "done"
