"""Will KVarN hurt my model? Accuracy of every method against the unquantized cache.

Runs ``kvarn-sglang eval`` on SmolLM2-135M with WikiText-2 (../shared/data) as the long
context: perplexity, KL(reference || quantized), top-1 agreement, the error-accumulation
curves (accumulated vs static) and greedy agreement on the prompts shipped in the package.
Prints the markdown tables; ``--output`` gets the JSON (device, versions, git commit and this
command included) and the plot goes next to it as a PNG; ``--show JSON`` reprints the tables of
a stored result.

    .venv/bin/python benchmarks/bench_accuracy.py \\
        --output benchmarks/results/accuracy_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from kvarn_sglang.eval.cli import main as cli_main
from kvarn_sglang.eval.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
METHODS = (
    "fp16,k4v2_g128,k4v4_g128,k2v2_g128,kvarn-norot-k2v2,kvarn-nonorm-k2v2,"
    "kivi2,kivi4,hadamard2,hadamard4,int4,int8,fp8"
)


def show(path: Path) -> int:
    """Print both markdown tables of a committed result."""
    from kvarn_sglang.eval.command import CURVE_NOTE
    from kvarn_sglang.eval.report import format_curve_table, format_table, result_from_json

    result = result_from_json(json.loads(path.read_text()))
    print(f"{format_table(result)}\n\n{CURVE_NOTE}\n\n{format_curve_table(result)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--gen-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default=None, help="results JSON; the PNG goes beside it")
    parser.add_argument("--show", default=None, help="print the tables of a results JSON, no run")
    args = parser.parse_args()
    if args.show:
        return show(Path(args.show))
    text = Path(args.data_dir) / "wikitext2-test.raw"
    if not text.exists():
        print(f"skipped: {text} not found (pass --data-dir)", file=sys.stderr)
        return 0
    command = " ".join(["python", "benchmarks/bench_accuracy.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        cli_args = ["eval", "--text", str(text), "--tokens", str(args.tokens)]
        cli_args += ["--methods", args.methods, "--gen-tokens", str(args.gen_tokens)]
        cli_args += ["--threads", str(args.threads), "--device", args.device, "--output", tmp]
        meta = {"command": command, "git_commit": git_commit()}
        code = cli_main(cli_args, extra_meta=meta)
        if code == 0 and args.output:
            out = Path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(tmp) / "results.json", out)
            shutil.copy(Path(tmp) / "accuracy.png", out.with_suffix(".png"))
            print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
