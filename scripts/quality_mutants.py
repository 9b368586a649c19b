"""Show `pytest -m quality` failing on purpose: apply each named way of making KVarN worse
(issue 27, deliverable 4) to the source, run `pytest -m quality`, record which tests fail,
restore the source. Every change keeps the implementations consistent with each other (a
shared constant, or the torch reference that the eval and the quality tests run), so only a
test of quality itself can see it. Not in CI (about 3 minutes per change).

    KVARN_SHARED_DATA=../shared/data .venv/bin/python scripts/quality_mutants.py \\
        --output benchmarks/results/quality_mutants.json

Writes the failing tests and the wall seconds of each change (JSON; docs/quality.md renders it
with ``benchmarks.render_tables``) and prints the table. Exits 1 if a change passes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = "kvarn_sglang/quant/reference.py"

# name -> [(file, old, new)]: each old text must occur exactly once.
MUTANTS: dict[str, list[tuple[str, str, str]]] = {
    "variance normalization off": [
        (
            REF,
            "    for _ in range(iters):\n        cur = m /",
            "    for _ in range(0):\n        cur = m /",
        ),
    ],
    "normalization log scales capped at 0.5": [
        (
            "kvarn_sglang/format/numerics.py",
            "LOG_MIN, LOG_MAX = -0.3, 10.0",
            "LOG_MIN, LOG_MAX = -0.3, 0.5",
        ),
    ],
    "truncation instead of rounding (RTN and refits)": [
        (
            "kvarn_sglang/quant/rtn.py",
            "codes = torch.round((x - lo) / scale)",
            "codes = torch.floor((x - lo) / scale)",
        ),
        (
            "kvarn_sglang/quant/rtn.py",
            "q_new = torch.round((x - z_new) / s_new)",
            "q_new = torch.floor((x - z_new) / s_new)",
        ),
    ],
    "lost sink page (the reference reads it quantized)": [
        (REF, "first, full = config.sink_pages, t // g", "first, full = 0, t // g"),
        (REF, "sink = min(config.sink_pages, len(pages))", "sink = 0"),
    ],
    "no sink page at all (sink_pages 0 everywhere)": [
        ("kvarn_sglang/format/config.py", "    sink_pages: int = 1\n", "    sink_pages: int = 0\n"),
    ],
    "V grouped the wrong way (per channel, like K)": [
        (REF, "quantize_oriented(_tiles(v, False)", "quantize_oriented(_tiles(v, True)"),
        (
            REF,
            "v = _untiles(dequantize_oriented(v_t), False, p, h)",
            "v = _untiles(dequantize_oriented(v_t), True, p, h)",
        ),
    ],
    "fewer _plus refits (3 instead of 4)": [
        ("kvarn_sglang/format/config.py", "PLUS_REFIT_ITERS = 4", "PLUS_REFIT_ITERS = 3"),
    ],
}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_quality(extra: list[str]) -> tuple[list[str], float, int]:
    """The failing test ids, the wall seconds and the exit code of `pytest -m quality`."""
    started, cpu = time.perf_counter(), _children_cpu()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "quality", "-q", "-p", "no:cacheprovider", "-rf",
         *extra],
        cwd=ROOT, capture_output=True, text=True, env=os.environ | {"TRITON_INTERPRET": "1"},
    )  # fmt: skip
    wall, cpu = time.perf_counter() - started, _children_cpu() - cpu
    print(f"  {wall:.0f} s wall, {cpu:.0f} s of CPU", file=sys.stderr)
    failed = re.findall(r"^FAILED (\S+)", run.stdout, flags=re.M)
    if run.returncode not in (0, 1):
        print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
    return failed, wall, run.returncode


def apply(edits: list[tuple[str, str, str]]) -> dict[Path, str]:
    originals: dict[Path, str] = {}
    for file, old, new in edits:
        path = ROOT / file
        current = path.read_text()
        originals.setdefault(path, current)
        if current.count(old) != 1:
            raise ValueError(f"{file}: {old!r} occurs {current.count(old)} times (source moved?)")
        path.write_text(current.replace(old, new))
    return originals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results/quality_mutants.json")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated texts: run the changes "
        "whose name has one of them (and not the unchanged baseline)",
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    out = Path(args.output)
    rows = []

    def record(change: str, failed: list[str], wall: float) -> None:
        rows.append({"change": change, "failed": failed, "wall_s": wall})
        out.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1) + "\n")

    wanted = args.only.split(",") if args.only else None
    if wanted is None:
        failed, wall, _ = run_quality(args.pytest_args)
        print(f"unchanged: {len(failed)} failed, {wall:.0f} s", file=sys.stderr)
        record("none (the source as committed)", failed, wall)
    for name, edits in MUTANTS.items():
        if wanted and not any(w in name for w in wanted):
            continue
        originals = apply(edits)
        try:
            failed, wall, _ = run_quality(args.pytest_args)
        finally:
            for path, text in originals.items():
                path.write_text(text)
        print(f"{name}: {len(failed)} failed, {wall:.0f} s", file=sys.stderr)
        record(name, failed, wall)
    sys.path.insert(0, str(ROOT))
    from benchmarks.render_tables import quality_mutants

    print(quality_mutants(str(out.resolve())))
    mutants = [r for r in rows if not r["change"].startswith("none")]
    broken = any(r["failed"] for r in rows if r["change"].startswith("none"))
    return 1 if broken or any(not r["failed"] for r in mutants) else 0


if __name__ == "__main__":
    sys.exit(main())
