#!/usr/bin/env bash
# The main job on a CPU: build the environment, then start stock SGLang's server with
# --kv-cache kvarn on SmolLM2-135M (and an fp16 server to compare with), run an agentic
# multi-branch client workload against it, and print the KV capacity against fp16, the
# cached-token rate, throughput, teacher-forced agreement with `kvarn-sglang eval`, and the
# leak check. Extra arguments go to benchmarks/bench_server.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m benchmarks.bench_server --cpu "$@"
