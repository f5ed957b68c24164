#!/usr/bin/env bash
# Idempotent set-up on Debian as root: system packages, .venv, pinned Python packages.
# Re-running is cheap: each step checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(pkg-config g++ libturbojpeg0-dev libopencv-dev)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
python3 -c "import ensurepip, venv" 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install.sh: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=$(cat requirements.lock requirements-nodeps.lock setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  echo "install.sh: installing pinned Python packages into .venv (first time: ~2 min)"
  .venv/bin/pip install -q -r requirements.lock 2>&1 | grep -v "is ignored" || true
  # ffcv pins opencv-python (GUI build); we use opencv-python-headless from the lock instead.
  .venv/bin/pip install -q --no-deps -r requirements-nodeps.lock 2>&1 | grep -v "is ignored" || true
  .venv/bin/pip install -q --no-deps -e . 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import torch, torchvision, ffcv, deepspeed, pycocotools, submitit" \
    2>/dev/null || { echo "install.sh: Python packages failed to import" >&2; exit 1; }
  # DeepSpeed compiles its CPU shared-memory collectives at the first distributed start (~50 s
  # on 2 cores), then loads them from ~/.cache/torch_extensions: compile them here, with the
  # install, so that the first run (the demo, the tests) does not pay for it.
  DS_ACCELERATOR=cpu .venv/bin/python -c \
    "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 ||
    echo "install.sh: DeepSpeed's shm comm op did not build now; the first run will build it"
  echo "$stamp" > .venv/.installed
fi
