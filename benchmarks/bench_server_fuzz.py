"""Can any request take a KVarN server down, and does anything leak? A seeded fuzz run.

Starts stock ``python -m sglang.launch_server --kv-cache kvarn`` on this machine's CPU
(``benchmarks.harness.server_process``) with the tiny checkpoint of
``benchmarks.harness.fuzz_model`` (one token makes layer 0's K non-finite) and a small pool
(``FUZZ_ARGS``: 64-token pages, 1,536 tokens of KV, 4 running requests, 10 fp16 slots, 256-token
prefill chunks, a 1,024-token context), so pages, slots and running requests all run short. Then
sends ``--requests`` seeded requests (``benchmarks.harness.server_fuzz``) from ``--concurrency``
threads and, with the server idle, flushes its cache and reads the KVarN pool back.

Prints a markdown table and writes JSON (``--output``): requests, results and errors by kind,
client aborts, leaked pages and slots (must be 0), whether the server stayed up, and every
problem found (must be none). ``--url`` fuzzes a server that is already running instead
(its pool and log are then read over HTTP only).

    python -m benchmarks.bench_server_fuzz --seed 0 --requests 400 \\
        --output benchmarks/results/server_fuzz.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.harness.common import result_header
from benchmarks.harness.fuzz_model import write_fuzz_model
from benchmarks.harness.server_fuzz import FUZZ_ARGS, fuzz
from benchmarks.harness.server_process import ServerProcess


def _table(result: dict) -> str:
    rows = ["| kind | requests | results |", "|---|---|---|"]
    for kind, count in sorted(result["by_kind"].items()):
        results = {
            k.split("/")[1]: v for k, v in result["by_kind_and_result"].items()
            if k.startswith(kind + "/")
        }  # fmt: skip
        rows.append(f"| {kind} | {count} | {', '.join(f'{k} {v}' for k, v in results.items())} |")
    leaks = result["leaks"]
    rows.append("")
    rows.append(
        f"server alive: {result['server_alive']}; leaked slots {leaks['slots_leaked']}, "
        f"pages {leaks['pages_leaked']}; problems: {len(result['problems'])}; "
        f"{result['seconds']} s"
    )
    return "\n".join(rows)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="fuzz a running server instead of starting one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--log-dir", default="out/server_logs", help="the started server's log")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    header = result_header(argv, "cpu")
    if args.url:
        server = ServerProcess("unused", [], Path(args.log_dir) / "unused.log")
        server.url = args.url.rstrip("/")
        result = fuzz(server, args.seed, args.requests, args.concurrency)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = write_fuzz_model(Path(tmp) / "fuzz_model")
            log = Path(args.log_dir) / f"fuzz_seed{args.seed}.log"
            with ServerProcess(model, FUZZ_ARGS, log) as server:
                result = fuzz(server, args.seed, args.requests, args.concurrency)
                result["server_args"] = FUZZ_ARGS
    result = header | result
    print(_table(result))
    for problem in result["problems"]:
        print("PROBLEM:", problem)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    leaks = result["leaks"]
    ok = (
        result["server_alive"]
        and not result["problems"]
        and not any(leaks[k] for k in ("slots_leaked", "pages_leaked"))
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
