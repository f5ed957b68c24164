#!/usr/bin/env bash
# The demo: install what is missing, generate the demo data set in the real download layouts,
# convert all nine datasets to FFCV shards at 128x80, and run the whole pipeline on ResNet-18,
# small: one epoch of MD-MoCo and one round of continual learning (MUSCLE, MUSCLE--; a visit is
# an epoch) on 2 CPU processes (gloo), as torchrun starts them on a GPU node, then the fine-tune
# grid (4 tasks x the inits whose weights exist) on 10 % of each training split, and print the
# paper's Tables 2 and 3 for the demo data and what they show in words, after what MD-MoCo's
# monitors say about its features. Run directories follow the layout the fine-tune stage reads
# (configs/finetune.yaml): $RUN/mdmoco_r18, $RUN/continual_r18, $RUN/continual_r18_muscle--,
# $RUN/finetune/<task>_r18_<init>_10pct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export DS_ACCELERATOR=cpu
RUN=${RUN:-demo_run}
SCALE=${SCALE:-small}
.venv/bin/python -m data_prep.synth --out "$RUN/downloads" --scale "$SCALE" --workers 2
.venv/bin/python -m data_prep.convert --dataset all --root "$RUN/downloads" --out "$RUN/shards" \
  --size 128x80 --workers 2
.venv/bin/python -m muscle_hpc.data.summary --data "$RUN/shards"
.venv/bin/torchrun --standalone --nproc_per_node 2 -m muscle_hpc.stages.mdmoco \
  --config configs/mdmoco_demo.yaml data.root="$RUN/shards" run.dir="$RUN/mdmoco_r18"
.venv/bin/python - "$RUN/mdmoco_r18" <<'PY'
import sys

import torch
import torchvision

from muscle_hpc import config, monitor
from muscle_hpc.tblog import read_scalars

run = sys.argv[1]
resnet = torchvision.models.resnet18()
resnet.load_state_dict(torch.load(f"{run}/backbone_torchvision.pth", weights_only=True))
cfg = config.load_config(f"{run}/config.yaml")
scalars = read_scalars(f"{run}/tb")
steps = max(step for points in scalars.values() for step, _ in points)
print(f"MD-MoCo demo: {steps} steps of batch {cfg.data.batch_size}, "
      f"K {cfg.model.K}; each curve from its first logged quarter to its last:")
for line in monitor.pretext_report(scalars, cfg.model.K, cfg.data.batch_size):
    print(f"  {line}")
print(f"{run}/backbone_torchvision.pth loads into torchvision.models.resnet18()")
print(f"TensorBoard: .venv/bin/tensorboard --logdir {run}/tb  (serves on 127.0.0.1)")
PY
# Only MUSCLE's validation after every visit is printed below; MUSCLE-- skips it (half of its
# run time here; validation leaves training bit for bit unchanged).
for method in muscle muscle--; do
  dir="$RUN/continual_r18" validate=true
  [ "$method" = muscle ] || dir="${dir}_$method" validate=false
  .venv/bin/torchrun --standalone --nproc_per_node 2 -m muscle_hpc.stages.continual \
    --config configs/continual_demo.yaml data.root="$RUN/shards" cl.method="$method" \
    model.init="$RUN/mdmoco_r18/backbone_torchvision.pth" run.dir="$dir" run.validate="$validate"
done
.venv/bin/python - "$RUN/continual_r18" <<'PY'
import json
import sys

import torch
import torchvision

from muscle_hpc.registry import TASK_NAMES
from muscle_hpc.stages.continual import matrix_markdown

run = sys.argv[1]
matrix = json.load(open(f"{run}/validation.json"))
print("Continual learning demo (MUSCLE): validation of every task after every visit")
print(matrix_markdown(matrix, [t for t in TASK_NAMES if t in matrix[0]]))
print("Backbone drift |w - w0| over each visit (MUSCLE: LR restarted per visit, L2-SP pull "
      "toward the visit's start; MUSCLE--: one decaying LR, no pull):")
for name, folder in (("MUSCLE", run), ("MUSCLE--", f"{run}_muscle--")):
    visits = json.load(open(f"{folder}/visits.json"))
    print(f"  {name:9s}" + " ".join(f"{v['task']} {v['drift']:.3f}" for v in visits))
resnet = torchvision.models.resnet18()
resnet.load_state_dict(torch.load(f"{run}/backbone_torchvision.pth", weights_only=True))
print(f"{run}/backbone_torchvision.pth loads into torchvision.models.resnet18()")
print(f"TensorBoard: .venv/bin/tensorboard --logdir {run}/tb  (serves on 127.0.0.1)")
PY
# The ResNet-18 half of the grid; ImageNet only if its weights are in the torch hub cache
# (nothing is downloaded). Two fine-tunes at a time, one thread each, on the 2 cores.
FT=(--config configs/finetune_demo.yaml data.root="$RUN/shards" run.root="$RUN")
skip=none
if ! .venv/bin/python -m muscle_hpc.stages.finetune --task pneumonia --init imagenet \
    --backbone r18 --check "${FT[@]}" >/dev/null 2>"$RUN/imagenet_check.txt"; then
  skip=imagenet
  echo "Fine-tune demo without the ImageNet row: $(cut -d' ' -f3- "$RUN/imagenet_check.txt")"
fi
mkdir -p "$RUN/finetune_logs"
grid() {  # grid CONFIG LOG_PREFIX: the config's grid elements of ResNet-18, as an array would
  local config=$1 prefix=$2
  .venv/bin/python -m muscle_hpc.stages.finetune --list --config "$config" |
    awk -v skip="$skip" '$4 == "r18" && $3 != skip {print $1}' |
    OMP_NUM_THREADS=1 xargs -P 2 -I{} bash -c '
      i=$1 log=$2$1.log; shift 2
      .venv/bin/python -m muscle_hpc.stages.finetune --grid-index "$i" "$@" >"$log" 2>&1 ||
        { echo "fine-tune $i failed, see $log:"; tail -3 "$log"; exit 255; }
      tail -1 "$log"' _ {} "$prefix" "${FT[@]:2}" --config "$config"
}
grid configs/finetune_demo_10pct.yaml "$RUN/finetune_logs/"
# Two external tasks, on datasets pre-training never saw (a knee grade, hip segmentation):
# converted from their folders by one YAML entry each, defined by one YAML entry each.
.venv/bin/python -m data_prep.convert --datasets configs/external_datasets.yaml \
  --root "$RUN/downloads" --out "$RUN/shards" --size 128x80 --workers 2
grid configs/external_demo.yaml "$RUN/finetune_logs/external_"
.venv/bin/python -m muscle_hpc.report "$RUN"
# MUSCLE's backbone as users load it: a hub folder with its model card (the tables above in it).
.venv/bin/python -m muscle_hpc.export "$RUN/continual_r18" --format hub
echo "These are demo-scale numbers (synthetic X-rays at 128x80, one epoch of MD-MoCo and of each"
echo "continual visit, fine-tunes on 10 % of the labels, one seed; test splits of 13-107 images),"
echo "not the paper's, which come from days of training on the real datasets at 800x500. Whether"
echo "pre-training helps at this scale, over seeds: python -m bench.learning (README, Benchmarks)."
