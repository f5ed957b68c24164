#!/usr/bin/env bash
#SBATCH --job-name=muscle-cl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR2@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Continual learning (MUSCLE stage 2) on Slurm, the sbatch way (python -m muscle_hpc.launch
# --stage cl is the submitit way). Submit from the repository root:
#
#   sbatch [--nodes N --gpus-per-node G --ntasks-per-node G ...] slurm/cl.sh [CONFIG] [key=value ...]
#   CONFIG=configs/continual_r18.yaml OVERRIDES="data.root=/data/shards" sbatch slurm/cl.sh
#   sbatch --gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=2 slurm/cl.sh CONFIG run.allow_cpu=true
#
# The defaults above are 2 nodes of 8 GPUs, one task per GPU: a GPU cluster needs no option.
# Where there are no GPUs (a CPU partition, tools/local_slurm.sh) the request must be cancelled
# or Slurm refuses the job: --gpus-per-node=0 on the command line (or SBATCH_GPUS_PER_NODE=0 in
# the environment, e.g. for slurm/pipeline.sh) does it, and with run.allow_cpu=true the stage
# runs on CPU with gloo (without it, a stage that finds no GPU refuses to start).
# --gres=none does not: sbatch keeps the header's GPUs. Arguments and OVERRIDES reach the stage
# as separate words, never through a shell: nothing here is evaluated. Before the time limit
# Slurm sends USR2 to this script, which passes it to the tasks; they checkpoint after their
# current step and the job is requeued (at most MAX_REQUEUES times) and resumes from that
# checkpoint.
# Preemption (SIGTERM, scontrol requeue) checkpoints the same way and Slurm requeues the job.
STAGE=continual DEFAULT_CONFIG=configs/continual_r50.yaml
# sbatch runs a copy of this file; the shared body is read from the submit directory.
source "${SLURM_SUBMIT_DIR:-.}/slurm/stage_body.sh"
