#!/usr/bin/env bash
#SBATCH --job-name=muscle-mdmoco
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR2@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# MD-MoCo on Slurm, the sbatch way (python -m muscle_hpc.launch is the submitit way). Submit
# from the repository root; one task per GPU:
#
#   sbatch [--nodes N --ntasks-per-node G --gpus-per-node G ...] slurm/mdmoco.sh [CONFIG] [key=value ...]
#   CONFIG=configs/mdmoco_r18.yaml OVERRIDES="run.dir=runs/r18 data.root=/data/shards" sbatch slurm/mdmoco.sh
#
# Add --gpus-per-node (or --gres=gpu:G) for your cluster; the defaults above ask for none so the
# script also runs on CPU clusters (gloo). Arguments and OVERRIDES reach the stage as separate
# words, never through a shell: nothing here is evaluated. Before the time limit Slurm sends
# USR2 to this script, which passes it to the tasks; they checkpoint after their current step
# and the job is requeued (at most MAX_REQUEUES times) and resumes from that checkpoint.
# Preemption (SIGTERM, scontrol requeue) checkpoints the same way and Slurm requeues the job.
set -uo pipefail

CONFIG_FILE=${1:-${CONFIG:-configs/mdmoco_r50.yaml}}
[ $# -gt 0 ] && shift
read -r -a EXTRA <<<"${OVERRIDES:-}"
MAX_REQUEUES=${MAX_REQUEUES:-10}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
RESTARTS=${SLURM_RESTART_COUNT:-0}

echo "mdmoco.sh: job ${SLURM_JOB_ID:-?} (restart ${RESTARTS}) on ${SLURM_JOB_NODELIST:-?}," \
  "${SLURM_NTASKS:-?} tasks, config ${CONFIG_FILE}"

requeue() {
  if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
    echo "mdmoco.sh: not requeued: ${RESTARTS} restarts reached MAX_REQUEUES=${MAX_REQUEUES}"
    return
  fi
  echo "mdmoco.sh: checkpoint written, requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
}

on_usr2() {
  echo "mdmoco.sh: USR2 (time limit near): asking the tasks to checkpoint"
  kill -USR2 "$SRUN_PID" 2>/dev/null
  wait "$SRUN_PID"
  requeue
  exit 0
}
trap on_usr2 USR2

# Slurm defines the ranks; torchrun variables inherited from the submitting shell would
# override it (every task rank 0 of 1, all on one port).
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
srun --kill-on-bad-exit=1 "$PYTHON" -m muscle_hpc.stages.mdmoco --config "$CONFIG_FILE" \
  "${EXTRA[@]}" "$@" &
SRUN_PID=$!
wait "$SRUN_PID"
STATUS=$?
# `wait` returns early (status > 128) when the trap ran; the trap exits by itself.
exit "$STATUS"
