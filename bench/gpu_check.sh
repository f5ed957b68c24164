#!/usr/bin/env bash
# The GPU check on a GPU host that has torch but no package index: install the wheels carried
# in .wheels/, then `bench.stages --smoke` (must finish in 8 min) and the timing, with and
# without run.deterministic's kernels.
#
#   bash bench/gpu_check.sh --download   # here, with PyPI: fetch bench/gpu_wheels.txt to .wheels/
#   bash bench/gpu_check.sh [smoke|timing|all]   # there (default all; each part under 10 min)
#
# Output goes to stdout and to $OUT/{gpu,smoke,stages,stages_deterministic}.txt ($OUT defaults
# to ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # the interpreter that has torch (and pip)
if [[ "${1:-}" == --download ]]; then
    # DeepSpeed publishes a source archive only: its wheel (pure Python, no prebuilt ops) is
    # built here; the rest are downloaded for CPython 3.12 on x86-64 Linux.
    grep -v '^deepspeed==' bench/gpu_wheels.txt > .wheels.txt
    "$PYTHON" -m pip download --quiet --dest .wheels --no-deps --only-binary=:all: \
        --implementation cp --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -r .wheels.txt \
        && DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation \
            --wheel-dir .wheels "$(grep '^deepspeed==' bench/gpu_wheels.txt)"
    status=$?
    rm -f .wheels.txt
    exit $status
fi
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
"$PYTHON" -m pip install --quiet --no-index --find-links .wheels --no-deps -r bench/gpu_wheels.txt \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu.txt"
part=${1:-all}
status=0
if [[ $part == smoke || $part == all ]]; then
    timeout 480 "$PYTHON" -m bench.stages --smoke --dir "$OUT/smoke_runs" 2>&1 | tee "$OUT/smoke.txt"
    code=${PIPESTATUS[0]}
    rm -rf "$OUT/smoke_runs"
    echo "gpu_check: smoke exit $code"
    status=$((status | code))
fi
if [[ $part == timing || $part == all ]]; then
    timeout 270 "$PYTHON" -m bench.stages 2>&1 | tee "$OUT/stages.txt"
    code=${PIPESTATUS[0]}
    timeout 270 "$PYTHON" -m bench.stages --deterministic 2>&1 | tee "$OUT/stages_deterministic.txt"
    code=$((code | PIPESTATUS[0]))
    echo "gpu_check: timing exit $code"
    status=$((status | code))
fi
exit $status
