#!/usr/bin/env bash
# The srun command of tools/slurm_train.sh and tools/slurm_test.sh:
#   bash tools/misc/slurm_srun.sh PARTITION JOB_NAME SCRIPT [SCRIPT's arguments...]
# runs `python -u SCRIPT ...` as one task per GPU, with (environment):
#   GPUS (default 8) tasks in all, GPUS_PER_NODE (default min(GPUS, 8)) per node,
#   CPUS_PER_TASK (default 5), SRUN_ARGS (more srun options), PYTHON (default python).
set -euo pipefail
PARTITION=$1
JOB_NAME=$2
SCRIPT=$3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$((GPUS < 8 ? GPUS : 8))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
read -r -a EXTRA_SRUN_ARGS <<< "${SRUN_ARGS:-}"
# The checkout's orepa_mm for tasks on nodes where it is not installed.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec srun --partition="$PARTITION" --job-name="$JOB_NAME" --gres="gpu:$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
    ${EXTRA_SRUN_ARGS[@]+"${EXTRA_SRUN_ARGS[@]}"} "${PYTHON:-python}" -u "$SCRIPT" "${@:4}"
