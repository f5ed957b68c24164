#!/usr/bin/env bash
# The whole MUSCLE pipeline for one backbone as chained Slurm jobs, the sbatch way (python -m
# muscle_hpc.launch --stage all is the submitit way, and checks every config first). Run with
# bash (not sbatch), from the repository root:
#
#   bash slurm/pipeline.sh [--backbone r18|r50] [--root DIR] [--data-root DIR]
#       [--mdmoco-config F] [--cl-config F] [--finetune-config F] [--array SPEC]
#       [--mdmoco-override K=V] [--cl-override K=V] [--finetune-override K=V] [K=V ...]
#       [--print-layout]
#
# submits, with sbatch --parsable, and prints the job ids:
#   1. slurm/mdmoco.sh         run.dir=ROOT/mdmoco_BB
#   2. slurm/cl.sh             MUSCLE, run.dir=ROOT/continual_BB              } afterok:1
#   3. slurm/cl.sh             MUSCLE⁻⁻ (cl.method=muscle--),                 } both from
#                              run.dir=ROOT/continual_BB_muscle--             } 1's backbone
#   4. slurm/finetune_array.sh the backbone's grid elements (the paper's 20),   afterok:2:3
#                              run.root=ROOT
# These are the directories the fine-tune config's `pretrained` templates name. They, the
# default configs and the array indices come from muscle_hpc/registry.py (python -m
# muscle_hpc.registry layout, run with $PYTHON: .venv/bin/python if there, else python3).
# Defaults: --backbone r50, --root runs, configs/mdmoco_BB.yaml, configs/continual_BB.yaml,
# configs/finetune.yaml, --array 0-19 (r18) or 20-39 (r50), or with another fine-tune config
# or --finetune-override, its grid's backbone range (see python -m muscle_hpc.stages.finetune
# --list --config F; a subset of these works too). Plain K=V go to every stage,
# --X-override K=V (repeatable) to one. --print-layout prints the run directories, configs and
# array indices it would submit with, as KEY=VALUE lines, and submits nothing.
# Extra sbatch options: SBATCH_* variables that sbatch reads itself (SBATCH_PARTITION,
# SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...), MUSCLE_SBATCH for every job, MDMOCO_SBATCH,
# CL_SBATCH, FINETUNE_SBATCH for one stage's jobs, e.g.
#   MDMOCO_SBATCH="--nodes=4" bash slurm/pipeline.sh
# The job scripts' own defaults are GPUs (8 per node for MD-MoCo and continual, 1 per fine-tune
# element); on CPUs cancel that for every job, and say CPU is intended (run.allow_cpu):
#   SBATCH_GPUS_PER_NODE=0 MUSCLE_SBATCH="--ntasks-per-node=1 --cpus-per-task=2" \
#     bash slurm/pipeline.sh run.allow_cpu=true
# All of these reach sbatch and the stages as separate words: nothing is evaluated. If a
# submission fails, the jobs already submitted are cancelled.
set -euo pipefail

die() { echo "pipeline: error: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] || die "$1 needs a value"; }

BACKBONE=r50 ROOT=runs DATA_ROOT="" ARRAY="" MDMOCO_CONFIG="" CL_CONFIG="" FINETUNE_CONFIG=""
PRINT_LAYOUT=0
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
    --print-layout) PRINT_LAYOUT=1; shift ;;
    -h|--help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *=*) COMMON+=("$1"); shift ;;
    *) die "$1: neither an option nor key=value (see --help)" ;;
  esac
done

# The job scripts read slurm/stage_body.sh from the submit directory.
[ -f slurm/stage_body.sh ] || die "run from the repository root (no slurm/stage_body.sh here)"
# The registry's KEY=VALUE lines, split at the first '=' (a value is the rest of its line,
# verbatim: paths are never evaluated). It also checks --backbone.
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=$("$PYTHON" -m muscle_hpc.registry layout --root "$ROOT" --backbone "$BACKBONE" 2>&1) ||
  die "${OUT#registry: error: }"
declare -A LAYOUT=()
while IFS= read -r line; do
  LAYOUT[${line%%=*}]=${line#*=}
done <<<"$OUT"
MOCO_DIR=${LAYOUT[MDMOCO_DIR]}
declare -A CL_DIR=([muscle]=${LAYOUT[MUSCLE_DIR]} [muscle--]=${LAYOUT[MUSCLE_MINUS_DIR]})
INIT=model.init=${LAYOUT[MDMOCO_EXPORT]}
MDMOCO_CONFIG=${MDMOCO_CONFIG:-${LAYOUT[MDMOCO_CONFIG]}}
CL_CONFIG=${CL_CONFIG:-${LAYOUT[CL_CONFIG]}}
FINETUNE_CONFIG=${FINETUNE_CONFIG:-${LAYOUT[FINETUNE_CONFIG]}}
for f in "$MDMOCO_CONFIG" "$CL_CONFIG" "$FINETUNE_CONFIG"; do
  [ -f "$f" ] || die "$f: config file not found"
done
[ -z "$DATA_ROOT" ] || COMMON=("data.root=$DATA_ROOT" "${COMMON[@]}")
# The backbone's part of the fine-tune grid: the registry's (the paper's 40) for the default
# config, else what the stage's --list says of that config's grid section.
if [ -z "$ARRAY" ]; then
  ARRAY=${LAYOUT[FINETUNE_ARRAY]}
  if [ "$FINETUNE_CONFIG" != "${LAYOUT[FINETUNE_CONFIG]}" ] || [ ${#FINETUNE_OV[@]} -gt 0 ]; then
    LIST=$("$PYTHON" -m muscle_hpc.stages.finetune --list --config "$FINETUNE_CONFIG" \
      "${COMMON[@]}" "${FINETUNE_OV[@]}" 2>&1) || die "${LIST#finetune: error: }"
    ARRAY=$(sed -n "s/^# $BACKBONE: --array=//p" <<<"$LIST")
    [ -n "$ARRAY" ] || die "$FINETUNE_CONFIG: its grid has no $BACKBONE element (grid.backbones)"
  fi
fi
read -r -a ALL_OPTS <<<"${MUSCLE_SBATCH:-}"
read -r -a MDMOCO_OPTS <<<"${MDMOCO_SBATCH:-}"
read -r -a CL_OPTS <<<"${CL_SBATCH:-}"
read -r -a FINETUNE_OPTS <<<"${FINETUNE_SBATCH:-}"
if [ "$PRINT_LAYOUT" = 1 ]; then
  printf '%s\n' "MDMOCO_DIR=$MOCO_DIR" "MDMOCO_EXPORT=${INIT#model.init=}" \
    "MUSCLE_DIR=${CL_DIR[muscle]}" "MUSCLE_MINUS_DIR=${CL_DIR[muscle--]}" \
    "FINETUNE_ROOT=${LAYOUT[FINETUNE_ROOT]}" "FINETUNE_ARRAY=$ARRAY" \
    "MDMOCO_CONFIG=$MDMOCO_CONFIG" "CL_CONFIG=$CL_CONFIG" "FINETUNE_CONFIG=$FINETUNE_CONFIG"
  exit 0
fi

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
submit "${ALL_OPTS[@]}" "${MDMOCO_OPTS[@]}" slurm/mdmoco.sh "$MDMOCO_CONFIG" \
  "${COMMON[@]}" "${MDMOCO_OV[@]}" "run.dir=$MOCO_DIR"
MDMOCO=$JOB
echo "pipeline: mdmoco job $MDMOCO: $MOCO_DIR"
CONTINUAL=()
for method in muscle muscle--; do
  dir=${CL_DIR[$method]}
  submit --dependency="afterok:$MDMOCO" --job-name="muscle-cl-$method" \
    "${ALL_OPTS[@]}" "${CL_OPTS[@]}" slurm/cl.sh "$CL_CONFIG" \
    "${COMMON[@]}" "${CL_OV[@]}" "cl.method=$method" "$INIT" "run.dir=$dir"
  CONTINUAL+=("$JOB")
  echo "pipeline: continual job $JOB ($method, after $MDMOCO): $dir"
done
submit --dependency="afterok:${CONTINUAL[0]}:${CONTINUAL[1]}" --array="$ARRAY" \
  "${ALL_OPTS[@]}" "${FINETUNE_OPTS[@]}" slurm/finetune_array.sh "$FINETUNE_CONFIG" \
  "${COMMON[@]}" "${FINETUNE_OV[@]}" "run.root=$ROOT"
echo "pipeline: finetune array $JOB (indices $ARRAY, after ${CONTINUAL[*]}):" \
  "${LAYOUT[FINETUNE_ROOT]}"
