#!/usr/bin/env bash
# The test command (CI runs exactly this): install what is missing, lint, start the local
# 4-node Slurm cluster (tools/local_slurm.sh) for the launcher tests, run the tests (printing the
# 25 slowest, so a CI log shows where its minutes go), stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export DS_ACCELERATOR=cpu PYTHONDONTWRITEBYTECODE=1
.venv/bin/ruff check .
started=0
if ! bash tools/local_slurm.sh status >/dev/null 2>&1; then
  bash tools/local_slurm.sh start
  started=1
fi
trap 'if [ "$started" = 1 ]; then bash tools/local_slurm.sh stop; fi' EXIT
export MUSCLE_SLURM=1  # the Slurm tests fail instead of skipping when there is no cluster
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@"
