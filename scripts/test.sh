#!/usr/bin/env bash
# The test command: build the CPU environment, lint, then run the whole test suite.
# Triton kernels run under the interpreter (TRITON_INTERPRET=1), so no GPU is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TRITON_INTERPRET=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two workers (CI has two cores); every real-server test runs in one of them (conftest.py) so
# each shared server starts once.
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --durations=15 "$@"
