#!/usr/bin/env bash
# The test command (CI runs exactly this): install what is missing, lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export DS_ACCELERATOR=cpu PYTHONDONTWRITEBYTECODE=1
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
