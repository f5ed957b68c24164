#!/usr/bin/env bash
# The GPU check in one command, on a GPU host that has torch but no package index: install the
# wheels carried in .wheels/, then `bench.stages --smoke` (must finish in 8 min) and the timing.
#
#   bash bench/gpu_check.sh --download   # here, with PyPI: fetch bench/gpu_wheels.txt to .wheels/
#   bash bench/gpu_check.sh              # there: install from .wheels/, run, write to $OUT
#
# Output goes to stdout and to $OUT/smoke.txt and $OUT/stages.txt ($OUT defaults to ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == --download ]]; then
    # DeepSpeed publishes a source archive only: its wheel (pure Python, no prebuilt ops) is
    # built here; the rest are downloaded for CPython 3.12 on x86-64 Linux.
    grep -v '^deepspeed==' bench/gpu_wheels.txt > .wheels.txt
    python3 -m pip download --quiet --dest .wheels --no-deps --only-binary=:all: \
        --implementation cp --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -r .wheels.txt \
        && DS_BUILD_OPS=0 python3 -m pip wheel --quiet --no-deps --no-build-isolation \
            --wheel-dir .wheels "$(grep '^deepspeed==' bench/gpu_wheels.txt)"
    status=$?
    rm -f .wheels.txt
    exit $status
fi
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install --quiet --no-index --find-links .wheels --no-deps -r bench/gpu_wheels.txt \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"
timeout 480 python3 -m bench.stages --smoke --dir "$OUT/smoke_runs" 2>&1 | tee "$OUT/smoke.txt"
smoke=${PIPESTATUS[0]}
rm -rf "$OUT/smoke_runs"
timeout 300 python3 -m bench.stages 2>&1 | tee "$OUT/stages.txt"
timing=${PIPESTATUS[0]}
echo "gpu_check: smoke exit $smoke, timing exit $timing"
[[ $smoke == 0 && $timing == 0 ]]
