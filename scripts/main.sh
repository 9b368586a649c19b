#!/usr/bin/env bash
# The main job on a CPU: build the environment, then measure how KVarN and every baseline change
# SmolLM2-135M against its FP16 cache (text and prompts embedded in the package). Extra
# arguments go to `kvarn-sglang eval`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/kvarn-sglang eval "$@"
