"""Does the KVarN pool stay consistent under a long random scheduler workload?

Runs ``tests/stress.py`` (SGLang's real allocator, radix cache and request pool with the KVarN
pool and attention backend, on CPU) for many steps and reports what happened: operations by
kind, prefix-cache hits, out-of-memory waits, retractions, invariant checks and output
comparisons. Any broken invariant stops the run with a minimal replayable sequence.

    python -m benchmarks.bench_stress --seed 0 --steps 20000 \
        --output benchmarks/results/stress_seed0.json
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.harness.common import ROOT, result_header, write_result

sys.path.insert(0, str(ROOT / "tests"))  # the harness lives with the tests it extends

from stress import StressFailure, run_stress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--num-pages", type=int, default=10, help="KV pages of 64 tokens")
    parser.add_argument("--num-slots", type=int, default=None, help="default: running x 2 + 1")
    parser.add_argument("--max-running", type=int, default=4)
    parser.add_argument("--shrink-budget-s", type=float, default=300.0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        stats = run_stress(
            args.seed,
            args.steps,
            shrink_budget_s=args.shrink_budget_s,
            num_pages=args.num_pages,
            num_slots=args.num_slots,
            max_running=args.max_running,
        )
    except StressFailure as failure:
        print(failure, file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    print(f"seed {args.seed}: {args.steps} steps in {seconds:.1f} s, every invariant held\n")
    print("| counter | value |\n|---|---|")
    for key in sorted(stats):
        print(f"| {key} | {stats[key]} |")
    body = {
        "seed": args.seed,
        "steps": args.steps,
        "num_pages": args.num_pages,
        "num_slots": args.num_slots,
        "max_running": args.max_running,
        "seconds": round(seconds, 2),
        "stats": stats,
    }
    write_result(args.output, result_header(argv, "cpu"), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
