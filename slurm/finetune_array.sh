#!/usr/bin/env bash
#SBATCH --job-name=muscle-finetune
#SBATCH --array=0-39
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR2@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
#
# Fine-tuning (MUSCLE stage 3) on Slurm as one job array, the sbatch way (python -m
# muscle_hpc.launch --stage finetune is the submitit way). Array index N is element N of the
# config's grid (its grid section); by default the paper's task x init x backbone (4 x 5 x 2):
# index = backbone*20 + task*5 + init, listed by
#
#   python -m muscle_hpc.stages.finetune --list [--config CONFIG]
#
# (another grid, e.g. with protocols or fractions or tasks of your own: pass --array from what
# --list says for that config, as slurm/pipeline.sh does).
#
# Submit from the repository root, after the earlier stages have written their backbones under
# run.root (the config's `pretrained` templates; slurm/pipeline.sh chains all three):
#
#   sbatch [--array=0-19] [...] slurm/finetune_array.sh [CONFIG] [key=value ...]
#   CONFIG=configs/finetune.yaml OVERRIDES="run.root=runs data.root=/data/shards" sbatch slurm/finetune_array.sh
#   sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/finetune_array.sh CONFIG run.allow_cpu=true
#
# --array=0-19 is the ResNet-18 half, 20-39 the ResNet-50 half; any subset works (--array=2,7).
# Add `--check` to the arguments to have every element say what it would run, without training.
# The defaults above give each element one task on one GPU, with 8 CPUs for its data loaders
# (data.num_workers): a GPU cluster needs no option. Where there are no GPUs (a CPU partition,
# tools/local_slurm.sh) the request must be cancelled or Slurm refuses the job: --gpus-per-node=0
# on the command line (or SBATCH_GPUS_PER_NODE=0 in the environment) does it, and the element
# runs on CPU given run.allow_cpu=true; --gres=none does not. Arguments and OVERRIDES reach the
# stage as separate words, never through a shell.
# Before the time limit Slurm sends USR2 to this script; the element checkpoints and requeues
# itself (its own SLURM_JOB_ID, so the other elements are left alone), at most MAX_REQUEUES
# times, and resumes from its checkpoint.
STAGE=finetune DEFAULT_CONFIG=configs/finetune.yaml
STAGE_ARGS=(--grid-index "${SLURM_ARRAY_TASK_ID:?not an array job: submit with sbatch --array}")
# sbatch runs a copy of this file; the shared body is read from the submit directory.
source "${SLURM_SUBMIT_DIR:-.}/slurm/stage_body.sh"
