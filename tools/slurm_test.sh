#!/usr/bin/env bash
# Evaluation on a Slurm cluster, with the interface of OpenMMLab's own script:
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] [PYTHON=python] \
#       bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py arguments...]
# srun starts one task per GPU (tools/misc/slurm_srun.sh); each runs
# tools/test.py with --launcher slurm.
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: bash $0 PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py arguments...]" >&2
    exit 2
fi
TOOLS=$(cd "$(dirname "$0")" && pwd)
exec bash "$TOOLS/misc/slurm_srun.sh" "$1" "$2" "$TOOLS/test.py" "$3" "$4" --launcher=slurm "${@:5}"
