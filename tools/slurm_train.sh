#!/usr/bin/env bash
# Training on a Slurm cluster, with the interface of OpenMMLab's own script:
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] [PYTHON=python] \
#       bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py arguments...]
# srun starts one task per GPU (tools/misc/slurm_srun.sh); each runs
# tools/train.py with --launcher slurm, and mmengine reads its rank and the
# world size from Slurm's environment.
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: bash $0 PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py arguments...]" >&2
    exit 2
fi
TOOLS=$(cd "$(dirname "$0")" && pwd)
exec bash "$TOOLS/misc/slurm_srun.sh" "$1" "$2" "$TOOLS/train.py" "$3" --work-dir="$4" --launcher=slurm "${@:5}"
