#!/usr/bin/env bash
# Distributed evaluation on one machine, as OpenMMLab ships it:
#   bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py arguments...]
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
PORT=${PORT:-29500}  # PYTHON: the interpreter (default: python on PATH)
"${PYTHON:-python}" -m torch.distributed.run --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
