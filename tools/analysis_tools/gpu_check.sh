#!/usr/bin/env bash
# The GPU check, in one go: the library's tests with their CUDA cases, and the
# training-step benchmark of plain / DBB / OREPA detectors on the GPU, summarised
# as OUT_DIR/gpu_check.{json,md}.
#
#   bash tools/analysis_tools/gpu_check.sh OUT_DIR          # on a CUDA machine (make gpu-check OUT=...)
#   bash tools/analysis_tools/gpu_check.sh OUT_DIR --cpu    # dry run of every step on the CPU, tiny sizes
#
# Needs a Python with torch (a CUDA build on the GPU machine) and torchvision.
# orepa_mm's own dependencies that such a machine may lack (mmengine,
# mmcv-lite and theirs) come as wheels in .whl/ (scripts/gpu_wheels.sh makes
# them on a machine with registry access); they are installed with
# `pip install --no-index --no-deps` into a private folder, so the machine's
# torch stays as it is.  Nothing else is fetched.
#
# What it runs (each step's output under OUT_DIR; a failing step does not stop
# the later ones, the exit status says whether any failed):
#   environment.json  Python, torch, CUDA, the card, the commit
#   tests.xml/.txt    pytest --core: kernels, layers, batched generation (eager
#                     and replayed from CUDA graphs), fuse, dtypes (fp16/bf16
#                     autocast, GradScaler), torch.compile; CUDA cases included
#   bench/            tools/analysis_tools/benchmark.py: torchvision Faster R-CNN
#                     R50-FPN at 800x1333, batch 2 and 8, plain / DBB / OREPA,
#                     float32 and AMP float16 / bfloat16, eager and replayed
#                     generation (--capture cuda)
#   sweep/            the cost sweep (benchmark.py --sweep): ResNet-50 at 224x224,
#                     batch 1 to 32, plain / DBB / OREPA, float32 and AMP
#   deploy/           where TensorRT, mmdeploy and mmpretrain import (GPU only):
#                     the toy OREPA classifier trained for 20 iterations, then
#                     tools/deploy.py --backend tensorrt-fp16 --verify
#   gpu_check.json/.md  the summary (tools/analysis_tools/gpu_check_report.py)
#
# Environment knobs: PYTHON (default python3), GPU_CHECK_ROUNDS (timed rounds, default 5),
# GPU_CHECK_BATCHES (default "2 8"), GPU_CHECK_TESTS (what pytest runs, default "tests --core";
# the CI test of the dry run narrows it).
set -uo pipefail

OUT="${1:?usage: gpu_check.sh OUT_DIR [--cpu]}"
MODE="${2:-gpu}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
ROUNDS="${GPU_CHECK_ROUNDS:-5}"
START=$(date +%s)
FAILED=()
mkdir -p "$OUT/bench"
OUT="$(cd "$OUT" && pwd)"
log() { echo "[gpu-check $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

# -- set-up: the wheels brought along, beside the machine's own torch ------------------
# (Only where this Python lacks them: a machine's own mmcv, with its compiled ops, stays in use.)
if ! "$PY" -c "import mmengine, mmcv.cnn" 2> /dev/null && compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  SITE="${TMPDIR:-/tmp}/orepa_mm_site"
  log "installing $(ls "$ROOT"/.whl/*.whl | wc -l) wheels from .whl/ into $SITE (--no-index --no-deps)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$ROOT"/.whl/*.whl || { echo "gpu_check.sh: installing the wheels failed" >&2; exit 1; }
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
cd "$ROOT"

"$PY" - "$OUT/environment.json" "$MODE" <<'EOF' || { echo "gpu_check.sh: the environment is not usable" >&2; exit 1; }
import json, platform, subprocess, sys
import torch, mmengine, orepa_mm
mode = sys.argv[2]
if mode != '--cpu' and not torch.cuda.is_available():
    sys.exit('gpu_check.sh: CUDA is not available (use --cpu for a dry run on the CPU)')
commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
           mmengine=mmengine.__version__, orepa_mm=orepa_mm.__version__, git_commit=commit or None,
           device=torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU ({platform.processor()})',
           mode='cpu-dry-run' if mode == '--cpu' else 'gpu')
json.dump(env, open(sys.argv[1], 'w'), indent=2)
print(env)
EOF

# -- the library's tests, CUDA cases included ------------------------------------------------
read -r -a TESTS <<< "${GPU_CHECK_TESTS:-tests --core}"
log "tests: pytest ${TESTS[*]}"
if ! "$PY" -m pytest "${TESTS[@]}" -q -ra -p no:cacheprovider --junitxml "$OUT/tests.xml" > "$OUT/tests.txt" 2>&1; then
  FAILED+=(tests)
fi
tail -n 3 "$OUT/tests.txt"

# -- the benchmark ---------------------------------------------------------------------------
if [ "$MODE" = "--cpu" ]; then  # torchvision may be missing on the CPU machine: a small mmdet-free workload
  WORKLOAD=(--workloads resnet18 --input-size 64 64 --device cpu)
  BATCHES="2"; PRECISIONS="float32 bfloat16"; CAPTURES="off simulate"; ROUNDS=2
else
  WORKLOAD=(--workloads tv-faster-rcnn --input-size 800 1333 --device cuda)
  BATCHES="${GPU_CHECK_BATCHES:-2 8}"; PRECISIONS="float32 float16 bfloat16"; CAPTURES="off cuda"
fi
for batch in $BATCHES; do
  for precision in $PRECISIONS; do
    for capture in $CAPTURES; do
      amp=(); [ "$precision" = float32 ] || amp=(--amp --amp-dtype "$precision")
      name="b${batch}_${precision}_${capture}"
      log "benchmark: batch $batch, $precision, generation capture $capture"
      if ! "$PY" tools/analysis_tools/benchmark.py "${WORKLOAD[@]}" --variants plain dbb orepa \
          --batch-size "$batch" --rounds "$ROUNDS" --warmup 2 --skip-eval --capture "$capture" "${amp[@]}" \
          --out-dir "$OUT/bench" > "$OUT/bench/$name.log" 2>&1; then
        FAILED+=("benchmark $name")
        tail -n 5 "$OUT/bench/$name.log"
      fi
    done
  done
done

# -- the cost sweep: the step against the work per step, fp32 and AMP ---------------------------
if [ "$MODE" = "--cpu" ]; then
  SWEEP=(--workloads resnet18 --input-sizes 64 --batch-sizes 2 3 --device cpu); SWEEP_AMP="off"
else
  SWEEP=(--workloads resnet50 --input-sizes 224 --batch-sizes 1 2 4 8 16 32 --device cuda); SWEEP_AMP="off on"
fi
for amp_mode in $SWEEP_AMP; do
  amp=(); [ "$amp_mode" = on ] && amp=(--amp)
  log "sweep: ${SWEEP[*]} (AMP $amp_mode)"
  if ! "$PY" tools/analysis_tools/benchmark.py "${SWEEP[@]}" --sweep --variants plain dbb orepa --rounds "$ROUNDS" \
      --warmup 2 "${amp[@]}" --out-dir "$OUT/sweep" > "$OUT/sweep_amp-$amp_mode.log" 2>&1; then
    FAILED+=("sweep amp-$amp_mode")
    tail -n 5 "$OUT/sweep_amp-$amp_mode.log"
  fi
done

# -- TensorRT through mmdeploy, where it is installed -------------------------------------------
if [ "$MODE" != "--cpu" ] && "$PY" -c "import tensorrt, mmdeploy, mmpretrain, mmcv.ops" 2> /dev/null; then
  log "deploy: the toy classifier to TensorRT fp16 (tools/deploy.py --verify)"
  mkdir -p "$OUT/deploy"
  CLS_CFG="$ROOT/configs/toy/resnet18w32-orepa_1xb32-600i_toy-imagenet.py"
  if ! (cd "$OUT/deploy" && "$PY" "$ROOT/tools/misc/make_toy_data.py" --only imagenet > make_data.log 2>&1 \
        && "$PY" "$ROOT/tools/train.py" "$CLS_CFG" --work-dir work --cfg-options train_cfg.max_iters=20 \
             train_cfg.val_interval=20 default_hooks.checkpoint.interval=20 > train.log 2>&1 \
        && "$PY" "$ROOT/tools/deploy.py" "$CLS_CFG" work/iter_20.pth trt --backend tensorrt-fp16 \
             --device cuda:0 --verify > deploy.log 2>&1); then
    FAILED+=(deploy-tensorrt)
    tail -n 5 "$OUT/deploy/"*.log
  fi
else
  log "deploy: skipped (TensorRT, mmdeploy, mmpretrain and mmcv's ops are not all installed here)"
fi

echo $(( $(date +%s) - START )) > "$OUT/wall_time_s"
"$PY" tools/analysis_tools/gpu_check_report.py "$OUT" || FAILED+=(report)
log "done in $(( $(date +%s) - START )) s; summary: $OUT/gpu_check.md"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check.sh: failed steps: ${FAILED[*]}" >&2
  exit 1
fi
