#!/usr/bin/env bash
# Wheels for the GPU check (tools/analysis_tools/gpu_check.sh) on a machine
# without registry access that already has a CUDA torch, torchvision, numpy,
# opencv, pytest, rich and pyyaml: orepa_mm's other dependencies, pure Python,
# downloaded here into .whl/ (ignored by git) at the versions the pinned stack
# uses.  Carry .whl/ to the GPU machine beside the checkout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
pin() { grep -E "^$1==" "$ROOT/requirements/constraints.txt" | head -n 1; }
mkdir -p "$ROOT/.whl"
# mmengine and mmcv-lite (mmcv.cnn's bricks, which the tests build), and what they import that such a machine lacks.
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$ROOT/.whl" \
  "$(pin mmengine)" mmcv-lite==2.1.0 addict yapf termcolor platformdirs
ls -la "$ROOT/.whl"
du -sh "$ROOT/.whl"
