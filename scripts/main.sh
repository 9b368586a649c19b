#!/usr/bin/env bash
# The main job on a CPU: build the environment, then measure KVarN and every baseline on real
# KV captured from SmolLM2-135M (text embedded in the package). Extra arguments go to the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/kvarn-sglang quant-error "$@"
