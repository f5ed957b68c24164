#!/usr/bin/env bash
# The demo: install what is missing, generate the demo data set in the real download layouts,
# convert all nine datasets to FFCV shards, and run the pipeline that exists so far.
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
