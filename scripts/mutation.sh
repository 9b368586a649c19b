#!/usr/bin/env bash
# Mutation testing (not in CI): mutmut 3 mutates the quantizer core and the page-life code
# ([tool.mutmut] in pyproject.toml) and runs `pytest -m "quality or pagelife"` against each
# mutant (only the tests that reach the mutated function); then scripts/mutation_report.py
# writes benchmarks/results/mutation.{json,md}: killed, survived and timed out per function,
# every survivor's diff, and the reason each surviving quantizer-core mutant is equivalent.
#
#   bash scripts/mutation.sh            # everything (hours on one shared core)
#   JOBS=2 bash scripts/mutation.sh     # mutants tested in parallel
#   bash scripts/mutation.sh 'kvarn_sglang.quant.rtn.*'   # some mutants only (mutmut globs)
#
# It runs niced (the machine is shared); the shared data folder (../shared/data, or
# KVARN_SHARED_DATA) must hold wikitext2-test.raw for the model-level quality tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import mutmut" 2>/dev/null; then
    .venv/bin/python -m pip install -q --no-deps -r requirements/mutation.txt
fi
export TRITON_INTERPRET=1
export KVARN_SHARED_DATA=${KVARN_SHARED_DATA:-$(cd .. && pwd)/shared/data}
export OMP_NUM_THREADS=1
# mutmut keeps its results in mutants/ (ignored by git) and reuses them on a rerun
nice -n 10 .venv/bin/python -m mutmut run --max-children "${JOBS:-1}" "$@" || true
.venv/bin/python scripts/mutation_report.py --output benchmarks/results/mutation.json
