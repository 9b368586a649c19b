"""The fidelity figures that ``pytest -m quality`` asserts, measured and written as JSON.

SmolLM2-135M (the Hugging Face export the test servers use) on the first 768 tokens of
WikiText-2 test (../shared/data), decode-consistent: KL, top-1 and perplexity of fp8, KVarN's
4-bit and 2-bit presets (plain and ``_plus``) and KIVI-2 (``benchmarks.harness.fidelity``).
``tests/test_quality_model.py`` reads its figures from the JSON this writes, and
``docs/quality.md`` renders them (``benchmarks/render_tables.py``). Rerun after an intended
change of the quantizer, then commit the JSON:

    .venv/bin/python -m benchmarks.bench_quality --output benchmarks/results/quality_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness.common import ROOT, result_header, write_result
from benchmarks.harness.fidelity import METHODS, SCORED_FROM, TOKENS, load_bench, measure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    text = Path(args.data_dir) / "wikitext2-test.raw"
    if not text.exists():
        print(f"skipped: {text} not found (pass --data-dir)", file=sys.stderr)
        return 0
    bench = load_bench(text)
    figures = {}
    print(f"reference perplexity {bench.reference_ppl:.4f}")
    print("| method | KL | top-1 | ppl |\n|---|---|---|---|")
    for name in args.methods.split(","):
        m = measure(bench, name)
        figures[name] = {"kl": round(m.kl, 7), "top1": round(m.top1, 6), "ppl": round(m.ppl, 5)}
        print(f"| {name} | {m.kl:.6f} | {m.top1:.4f} | {m.ppl:.4f} |")
    body = {
        "model": "smollm2-135m (HF export, bf16 weights run in fp32)",
        "text": "wikitext2-test.raw",
        "tokens": TOKENS,
        "scored_from": SCORED_FROM,
        "threads": 1,
        "reference_ppl": round(bench.reference_ppl, 5),
        "figures": figures,
    }
    write_result(args.output, result_header(argv, "cpu"), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
