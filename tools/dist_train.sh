#!/usr/bin/env bash
# Distributed training on one machine, as OpenMMLab ships it:
#   bash tools/dist_train.sh CONFIG GPUS [tools/train.py arguments...]
# On a machine without CUDA the processes use gloo (see tools/train.py).
set -euo pipefail
CONFIG=$1
GPUS=$2
PORT=${PORT:-29500}  # PYTHON: the interpreter (default: python on PATH)
"${PYTHON:-python}" -m torch.distributed.run --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$(dirname "$0")/train.py" "$CONFIG" --launcher pytorch "${@:3}"
