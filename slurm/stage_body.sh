#!/usr/bin/env bash
# The body of slurm/<stage>.sh, sourced by them with STAGE and DEFAULT_CONFIG set (and optionally
# STAGE_ARGS, a bash array of arguments the script adds, e.g. --grid-index N): one srun of the
# stage, the USR2 trap that checkpoints and requeues. See slurm/mdmoco.sh for the usage.
set -uo pipefail

CONFIG_FILE=${1:-${CONFIG:-$DEFAULT_CONFIG}}
[ $# -gt 0 ] && shift
read -r -a EXTRA <<<"${OVERRIDES:-}"
MAX_REQUEUES=${MAX_REQUEUES:-10}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
RESTARTS=${SLURM_RESTART_COUNT:-0}
[ -v STAGE_ARGS ] || STAGE_ARGS=()
# An array element has its own SLURM_JOB_ID: requeueing that id requeues this element only.
ELEMENT=${SLURM_ARRAY_JOB_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})}

echo "$STAGE: job ${SLURM_JOB_ID:-?}${ELEMENT} (restart ${RESTARTS}) on ${SLURM_JOB_NODELIST:-?}," \
  "${SLURM_NTASKS:-?} tasks, config ${CONFIG_FILE}"

requeue() {
  if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
    echo "$STAGE: not requeued: ${RESTARTS} restarts reached MAX_REQUEUES=${MAX_REQUEUES}"
    return
  fi
  echo "$STAGE: checkpoint written, requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
}

on_usr2() {
  echo "$STAGE: USR2 (time limit near): asking the tasks to checkpoint"
  kill -USR2 "$SRUN_PID" 2>/dev/null
  wait "$SRUN_PID"
  local status=$?
  # 0: the stage finished in the grace period, nothing left to requeue for.
  if [ "$status" -eq 0 ]; then exit 0; fi
  requeue
  exit 0
}
trap on_usr2 USR2

# Slurm defines the ranks; torchrun variables inherited from the submitting shell would
# override it (every task rank 0 of 1, all on one port).
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
srun --kill-on-bad-exit=1 "$PYTHON" -m "muscle_hpc.stages.$STAGE" --config "$CONFIG_FILE" \
  "${STAGE_ARGS[@]}" "${EXTRA[@]}" "$@" &
SRUN_PID=$!
wait "$SRUN_PID"
STATUS=$?
# `wait` returns early (status > 128) when the trap ran; the trap exits by itself.
exit "$STATUS"
