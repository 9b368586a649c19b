"""Report of a mutation run (``scripts/mutation.sh``): killed, survived and timed out per
function, with the diff of every survivor and, for the quantizer core, why it is equivalent.

Reads mutmut 3's results in ``mutants/**/*.meta``; diffs come from ``mutmut show``. Writes
``--output`` (JSON) and the same path with ``.md``. The explanations of equivalent mutants live
in ``EQUIVALENT`` below, keyed by mutant name: a survivor of the quantizer core without one is
reported as unexplained (and the script exits 1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = (
    "kvarn_sglang.quant.reference",
    "kvarn_sglang.quant.rtn",
    "kvarn_sglang.format.layout",
    "kvarn_sglang.format.numerics",
    "kvarn_sglang.format.config",
)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout"}
STATUS.update({-24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not run"})
STATUS.update({-11: "crashed", -9: "crashed", 34: "skipped", 37: "caught by type check"})

# Surviving mutants of the quantizer core that no test can kill because they do not change
# what the code computes (or only in a way no input reaches), with the reason.
EQUIVALENT: dict[str, str] = {}


def _function(mutant: str) -> str:
    """``pkg.mod.x_func__mutmut_3`` -> ``pkg.mod.func``; methods keep their class."""
    module, _, name = mutant.rpartition(".")
    name = name.rsplit("__mutmut_", 1)[0]
    name = name.removeprefix("x_").replace("xǁ", "").replace("ǁ", ".")
    return f"{module}.{name}"


def _diff(mutant: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", mutant],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith(("-", "+", "@"))]
    return "\n".join(line for line in lines if not line.startswith(("---", "+++")))


def collect() -> dict:
    results: dict[str, str] = {}
    durations: dict[str, float] = {}
    for meta in sorted((ROOT / "mutants").rglob("*.meta")):
        data = json.loads(meta.read_text())
        for name, code in data.get("exit_code_by_key", {}).items():
            results[name] = STATUS.get(code, f"exit {code}")
        durations.update(data.get("durations_by_key", {}))
    per_function: dict[str, Counter] = defaultdict(Counter)
    for name, status in results.items():
        per_function[_function(name)][status] += 1
    survivors = []
    for name, status in sorted(results.items()):
        if status in ("survived", "timeout", "no tests"):
            core = name.startswith(CORE)
            survivors.append(
                {
                    "mutant": name,
                    "status": status,
                    "core": core,
                    "explanation": EQUIVALENT.get(name),
                    "diff": _diff(name),
                }
            )
    return {
        "command": "bash scripts/mutation.sh",
        "totals": dict(Counter(results.values())),
        "per_function": {f: dict(c) for f, c in sorted(per_function.items())},
        "survivors": survivors,
        "cpu_seconds": round(sum(d for d in durations.values() if d), 1),
    }


def markdown(report: dict) -> str:
    out = ["# Mutation testing report", "", f"Command: `{report['command']}`", ""]
    out.append("Totals: " + ", ".join(f"{k} {v}" for k, v in sorted(report["totals"].items())))
    out += ["", "| function | killed | survived | timeout | no tests |", "|---|---|---|---|---|"]
    for f, c in report["per_function"].items():
        row = [str(c.get(s, 0)) for s in ("killed", "survived", "timeout", "no tests")]
        out.append(f"| `{f}` | " + " | ".join(row) + " |")
    out += ["", "## Survivors", ""]
    for s in report["survivors"]:
        where = "quantizer core" if s["core"] else "page life"
        why = s["explanation"] or ("**unexplained**" if s["core"] else "not examined")
        out += [f"### `{s['mutant']}` ({s['status']}, {where})", "", f"Why: {why}", ""]
        out += ["```diff", s["diff"], "```", ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="benchmarks/results/mutation.json")
    args = parser.parse_args()
    report = collect()
    out = Path(args.output)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    unexplained = [s["mutant"] for s in report["survivors"] if s["core"] and not s["explanation"]]
    print(f"{report['totals']}; unexplained core survivors: {len(unexplained)}")
    for name in unexplained:
        print(f"  {name}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
