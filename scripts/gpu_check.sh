#!/usr/bin/env bash
# The GPU check: one command for a machine with a CUDA GPU, torch and Triton (no SGLang, no
# network; e.g. torch 2.11 + Triton 3.6). In about 8 minutes (the step limits add to 11) it
#   1. runs the kernel tests on CUDA against the reference (the inline-asm paths included);
#   2. times decode (contexts 4K/32K/128K, batch 1/32/128, GQA 4/8) against fp16-paged,
#      fp8-paged and SDPA (benchmarks/bench_decode.py);
#   3. times commit against a decode step, and a decode step's attention with no completing
#      page, with the commit in line and with it after attention on a side stream
#      (benchmarks/bench_commit.py);
#   4. captures one decode step (write, commit, attend) in a CUDA graph and replays it
#      (benchmarks/graph_decode_check.py);
#   5. times prefill over a packed prefix (4K/32K/128K tokens, 1K and 8K new, GQA 4/8) against
#      FlashInfer's paged prefill when it imports, SGLang's Triton extend when sglang imports,
#      and SDPA, all on fp16 K/V of the same shapes (benchmarks/bench_prefill.py);
# and writes decode_<gpu>.json, commit_<gpu>.json, graph_<gpu>.json, prefill_<gpu>.json and
# the logs to $OUT when set, else benchmarks/results/.
#
#   bash scripts/gpu_check.sh            # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run  # anywhere: every step on CPU, tiny, interpreted
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && $DRY == 1 ]] && PY=.venv/bin/python
DEST=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$DEST"

# The package maps kernels/ to kvarn_sglang.kernels at install time; without installing,
# an overlay of symlinks gives the same package (nothing is written into the checkout).
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
mkdir -p "$SITE/kvarn_sglang"
for f in "$ROOT"/kvarn_sglang/*; do ln -s "$f" "$SITE/kvarn_sglang/"; done
ln -s "$ROOT/kernels" "$SITE/kvarn_sglang/kernels"
ln -s "$ROOT/patches" "$SITE/kvarn_sglang/patches"
export PYTHONPATH="$SITE:$ROOT"
export PYTHONUNBUFFERED=1

if [[ $DRY == 1 ]]; then
    export TRITON_INTERPRET=1
    GPU=dry-run
else
    GPU=$($PY -c "import torch; n = torch.cuda.get_device_name(); print(n.split()[-1].lower())") || {
        echo "gpu_check: no CUDA device (use --dry-run)" >&2
        exit 1
    }
    nvidia-smi > "$DEST/env_$GPU.txt" 2>&1 || true
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$DEST/env_$GPU.txt"

status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log, remember failures
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$DEST/${name}_$GPU.log" 2>&1
    local rc=$?
    tail -n 25 "$DEST/${name}_$GPU.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [[ $rc == 0 ]] || status=1
}

if [[ $DRY == 1 ]]; then
    # The tests import (a GPU runs them all); the benchmarks run on tiny shapes.
    step tests 300 $PY -m pytest -q -o pythonpath= --collect-only tests/test_kernels_attention.py \
        tests/test_kernels_commit.py tests/test_kernels_codes.py
    step decode 300 $PY -m benchmarks.bench_decode --smoke --output "$DEST/decode_$GPU.json"
    step commit 300 $PY -m benchmarks.bench_commit --smoke --output "$DEST/commit_$GPU.json"
    step graph 300 $PY -m benchmarks.graph_decode_check --smoke --output "$DEST/graph_$GPU.json"
    step prefill 300 $PY -m benchmarks.bench_prefill --smoke --output "$DEST/prefill_$GPU.json"
else
    XDIST=""
    $PY -c "import xdist" 2> /dev/null && XDIST="-n 8"
    step tests 240 $PY -m pytest -q -o pythonpath= $XDIST -p no:cacheprovider \
        tests/test_kernels_attention.py tests/test_kernels_commit.py tests/test_kernels_codes.py
    step decode 200 $PY -m benchmarks.bench_decode --contexts 4096,32768,131072 \
        --batches 1,32,128 --gqa 4,8 --max-fp16-gib 40 --warmup 3 --iters 20 \
        --output "$DEST/decode_$GPU.json"
    step commit 60 $PY -m benchmarks.bench_commit --batches 1,8,32,64,128 --warmup 3 \
        --iters 20 --output "$DEST/commit_$GPU.json"
    step graph 60 $PY -m benchmarks.graph_decode_check --output "$DEST/graph_$GPU.json"
    step prefill 90 $PY -m benchmarks.bench_prefill --prefixes 4096,32768,131072 --new 1024,8192 \
        --gqa 4,8 --warmup 2 --iters 5 --output "$DEST/prefill_$GPU.json"
fi
echo "gpu_check: $([[ $status == 0 ]] && echo ok || echo FAILED); results in $DEST"
exit $status
