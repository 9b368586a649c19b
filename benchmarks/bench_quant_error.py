"""How large is each method's K, V and attention-output error on real K/V at each bit budget?

Captures post-RoPE Q/K/V of SmolLM2-135M on WikiText-2 (../shared/data) and runs the same
measurement as ``kvarn-sglang quant-error`` for KVarN and every baseline. Prints a markdown
table; ``--output`` writes JSON with the device, versions, git commit and this command.

    .venv/bin/python -m benchmarks.bench_quant_error \
        --output benchmarks/results/quant_error_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness.common import ROOT
from kvarn_sglang.eval.cli import main as cli_main
from kvarn_sglang.eval.provenance import git_commit
from kvarn_sglang.quant.baselines import DEFAULT_METHODS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    text = Path(args.data_dir) / "wikitext2-test.raw"
    if not text.exists():
        print(f"skipped: {text} not found (pass --data-dir)", file=sys.stderr)
        return 0
    cli_args = ["quant-error", "--text", str(text), "--tokens", str(args.tokens)]
    cli_args += ["--methods", args.methods]
    if args.output:
        cli_args += ["--output", args.output]
    command = " ".join(["python -m benchmarks.bench_quant_error", *sys.argv[1:]])
    return cli_main(cli_args, extra_meta={"command": command, "git_commit": git_commit()})


if __name__ == "__main__":
    sys.exit(main())
