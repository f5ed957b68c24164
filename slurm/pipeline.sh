#!/usr/bin/env bash
# The whole MUSCLE pipeline for one backbone as chained Slurm jobs, the sbatch way (python -m
# muscle_hpc.launch --stage all is the submitit way, and checks every config first). Run with
# bash (not sbatch), from the repository root:
#
#   bash slurm/pipeline.sh [--backbone r18|r50] [--root DIR] [--data-root DIR]
#       [--mdmoco-config F] [--cl-config F] [--finetune-config F] [--array SPEC]
#       [--mdmoco-override K=V] [--cl-override K=V] [--finetune-override K=V] [K=V ...]
#
# submits, with sbatch --parsable, and prints the job ids:
#   1. slurm/mdmoco.sh         run.dir=ROOT/mdmoco_BB
#   2. slurm/cl.sh             MUSCLE, run.dir=ROOT/continual_BB              } afterok:1
#   3. slurm/cl.sh             MUSCLE⁻⁻ (cl.method=muscle--),                 } both from
#                              run.dir=ROOT/continual_BB_muscle--             } 1's backbone
#   4. slurm/finetune_array.sh the backbone's 20 grid elements, run.root=ROOT,   afterok:2:3
# These are the directories the fine-tune config's `pretrained` templates name. Defaults:
# --backbone r50, --root runs, configs/mdmoco_BB.yaml, configs/continual_BB.yaml,
# configs/finetune.yaml, --array 0-19 (r18) or 20-39 (r50) (see python -m
# muscle_hpc.stages.finetune --list; a subset of these works too). Plain K=V go to every stage,
# --X-override K=V (repeatable) to one. Extra sbatch options: SBATCH_* variables that sbatch
# reads itself (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...), MUSCLE_SBATCH for
# every job, MDMOCO_SBATCH, CL_SBATCH, FINETUNE_SBATCH for one stage's jobs, e.g.
#   MDMOCO_SBATCH="--nodes=4 --gpus-per-node=8" FINETUNE_SBATCH="--gpus-per-node=1" bash slurm/pipeline.sh
# All of these reach sbatch and the stages as separate words: nothing is evaluated. If a
# submission fails, the jobs already submitted are cancelled.
set -euo pipefail

die() { echo "pipeline: error: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] || die "$1 needs a value"; }

BACKBONE=r50 ROOT=runs DATA_ROOT="" ARRAY="" MDMOCO_CONFIG="" CL_CONFIG="" FINETUNE_CONFIG=""
COMMON=() MDMOCO_OV=() CL_OV=() FINETUNE_OV=()
while [ $# -gt 0 ]; do
  case $1 in
    --backbone) need "$@"; BACKBONE=$2; shift 2 ;;
    --root) need "$@"; ROOT=$2; shift 2 ;;
    --data-root) need "$@"; DATA_ROOT=$2; shift 2 ;;
    --mdmoco-config) need "$@"; MDMOCO_CONFIG=$2; shift 2 ;;
    --cl-config) need "$@"; CL_CONFIG=$2; shift 2 ;;
    --finetune-config) need "$@"; FINETUNE_CONFIG=$2; shift 2 ;;
    --array) need "$@"; ARRAY=$2; shift 2 ;;
    --mdmoco-override) need "$@"; MDMOCO_OV+=("$2"); shift 2 ;;
    --cl-override) need "$@"; CL_OV+=("$2"); shift 2 ;;
    --finetune-override) need "$@"; FINETUNE_OV+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *=*) COMMON+=("$1"); shift ;;
    *) die "$1: neither an option nor key=value (see --help)" ;;
  esac
done

# Indices of GRID (muscle_hpc/stages/finetune.py): backbone*20 + task*5 + init.
case $BACKBONE in
  r18) ARRAY=${ARRAY:-0-19} ;;
  r50) ARRAY=${ARRAY:-20-39} ;;
  *) die "--backbone: $BACKBONE is not r18 or r50" ;;
esac
MDMOCO_CONFIG=${MDMOCO_CONFIG:-configs/mdmoco_$BACKBONE.yaml}
CL_CONFIG=${CL_CONFIG:-configs/continual_$BACKBONE.yaml}
FINETUNE_CONFIG=${FINETUNE_CONFIG:-configs/finetune.yaml}
# The job scripts read slurm/stage_body.sh from the submit directory.
[ -f slurm/stage_body.sh ] || die "run from the repository root (no slurm/stage_body.sh here)"
for f in "$MDMOCO_CONFIG" "$CL_CONFIG" "$FINETUNE_CONFIG"; do
  [ -f "$f" ] || die "$f: config file not found"
done
[ -z "$DATA_ROOT" ] || COMMON=("data.root=$DATA_ROOT" "${COMMON[@]}")
read -r -a ALL_OPTS <<<"${MUSCLE_SBATCH:-}"
read -r -a MDMOCO_OPTS <<<"${MDMOCO_SBATCH:-}"
read -r -a CL_OPTS <<<"${CL_SBATCH:-}"
read -r -a FINETUNE_OPTS <<<"${FINETUNE_SBATCH:-}"

JOBS=()
submit() {  # submit SBATCH_ARGS...: the new job's id in $JOB
  local out
  if ! out=$(sbatch --parsable "$@"); then
    [ ${#JOBS[@]} -eq 0 ] || scancel "${JOBS[@]}"
    echo "pipeline: error: sbatch failed${JOBS[*]:+; cancelled jobs ${JOBS[*]}}" >&2
    exit 1
  fi
  JOB=${out%%;*}  # "id" or "id;cluster"
  JOBS+=("$JOB")
}

# The run directories come last: they are the layout the fine-tune templates expect.
MOCO_DIR=$ROOT/mdmoco_$BACKBONE
submit "${ALL_OPTS[@]}" "${MDMOCO_OPTS[@]}" slurm/mdmoco.sh "$MDMOCO_CONFIG" \
  "${COMMON[@]}" "${MDMOCO_OV[@]}" "run.dir=$MOCO_DIR"
MDMOCO=$JOB
echo "pipeline: mdmoco job $MDMOCO: $MOCO_DIR"
INIT=model.init=$MOCO_DIR/backbone_torchvision.pth
CONTINUAL=()
for method in muscle muscle--; do
  dir=$ROOT/continual_$BACKBONE
  [ "$method" = muscle ] || dir=${dir}_$method
  submit --dependency="afterok:$MDMOCO" --job-name="muscle-cl-$method" \
    "${ALL_OPTS[@]}" "${CL_OPTS[@]}" slurm/cl.sh "$CL_CONFIG" \
    "${COMMON[@]}" "${CL_OV[@]}" "cl.method=$method" "$INIT" "run.dir=$dir"
  CONTINUAL+=("$JOB")
  echo "pipeline: continual job $JOB ($method, after $MDMOCO): $dir"
done
submit --dependency="afterok:${CONTINUAL[0]}:${CONTINUAL[1]}" --array="$ARRAY" \
  "${ALL_OPTS[@]}" "${FINETUNE_OPTS[@]}" slurm/finetune_array.sh "$FINETUNE_CONFIG" \
  "${COMMON[@]}" "${FINETUNE_OV[@]}" "run.root=$ROOT"
echo "pipeline: finetune array $JOB (indices $ARRAY, after ${CONTINUAL[*]}): $ROOT/finetune"
