#!/usr/bin/env bash
# The demo: install what is missing, generate the demo data set in the real download layouts,
# convert all nine datasets to FFCV shards, and run the pipeline that exists so far on 2 CPU
# processes (gloo), as torchrun starts it on a GPU node: a short MD-MoCo pre-training, then
# multi-task continual learning of its backbone on the four tasks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export DS_ACCELERATOR=cpu
RUN=${RUN:-demo_run}
SCALE=${SCALE:-small}
.venv/bin/python -m data_prep.synth --out "$RUN/downloads" --scale "$SCALE"
.venv/bin/python -m data_prep.convert --dataset all --root "$RUN/downloads" --out "$RUN/shards" \
  --size 400x250 --workers 2
.venv/bin/python -m muscle_hpc.data.summary --data "$RUN/shards"
.venv/bin/torchrun --standalone --nproc_per_node 2 -m muscle_hpc.stages.mdmoco \
  --config configs/mdmoco_demo.yaml data.root="$RUN/shards" run.dir="$RUN/mdmoco"
.venv/bin/python - "$RUN/mdmoco" <<'PY'
import math
import sys

import torch
import torchvision

from muscle_hpc.tblog import read_scalars

run = sys.argv[1]
resnet = torchvision.models.resnet18()
resnet.load_state_dict(torch.load(f"{run}/backbone_torchvision.pth", weights_only=True))
scalars = read_scalars(f"{run}/tb")
last = {tag: [v for _, v in scalars[f"train/{tag}"][-5:]] for tag in ("loss", "top1")}
step = scalars["train/loss"][-1][0]
print(f"MD-MoCo demo: {step} steps; last 5 steps: loss {sum(last['loss']) / 5:.3f} "
      f"(chance ln(1+K) = {math.log(257):.3f}), contrastive top-1 {sum(last['top1']) / 5:.3f} "
      f"(chance 1/257 = {1 / 257:.3f})")
print(f"{run}/backbone_torchvision.pth loads into torchvision.models.resnet18()")
print(f"TensorBoard: .venv/bin/tensorboard --logdir {run}/tb  (serves on 127.0.0.1)")
PY
.venv/bin/torchrun --standalone --nproc_per_node 2 -m muscle_hpc.stages.continual \
  --config configs/continual_demo.yaml data.root="$RUN/shards" \
  model.init="$RUN/mdmoco/backbone_torchvision.pth" run.dir="$RUN/continual"
.venv/bin/python - "$RUN/continual" <<'PY'
import json
import sys

import torch
import torchvision

from muscle_hpc.stages.continual import TASKS, matrix_markdown

run = sys.argv[1]
matrix = json.load(open(f"{run}/validation.json"))
print("Continual learning demo: validation of every task after every visit")
print(matrix_markdown(matrix, [t for t in TASKS if t in matrix[0]]))
resnet = torchvision.models.resnet18()
resnet.load_state_dict(torch.load(f"{run}/backbone_torchvision.pth", weights_only=True))
print(f"{run}/backbone_torchvision.pth loads into torchvision.models.resnet18()")
print(f"TensorBoard: .venv/bin/tensorboard --logdir {run}/tb  (serves on 127.0.0.1)")
PY
