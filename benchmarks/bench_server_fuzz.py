"""Can any request take a KVarN server down, and does anything leak? A seeded fuzz run.

Starts stock ``python -m sglang.launch_server --kv-cache kvarn`` on this machine's CPU
(``benchmarks.harness.server_process``) with the tiny checkpoint of
``benchmarks.harness.fuzz_model`` (one token makes layer 0's K non-finite) and a small pool
(``FUZZ_ARGS``: 64-token pages, 1,536 tokens of KV, 4 running requests, 10 fp16 slots, 256-token
prefill chunks, a 1,024-token context), so pages, slots and running requests all run short. Then
sends ``--requests`` seeded requests (``benchmarks.harness.server_fuzz``) from ``--concurrency``
threads and, with the server idle, flushes its cache and reads the KVarN pool back.

``--profiles`` runs the requests split over several server configurations, one server each
(``server_fuzz.PROFILES``: 256-token chunks; 64-token chunks; 128- and 192-token chunks with
``--enable-mixed-chunk``, whose continued chunks end inside pages), seed ``--seed + i`` for the
i-th; ``all`` names every profile.

Prints a markdown table and writes JSON (``--output``): requests, results and errors by kind,
client aborts, leaked pages and slots (must be 0), whether the server stayed up, and every
problem found (must be none), in total and per profile. ``--url`` fuzzes a server that is
already running instead (its pool and log are then read over HTTP only).

    python -m benchmarks.bench_server_fuzz --seed 0 --requests 400 \\
        --output benchmarks/results/server_fuzz.json
    python -m benchmarks.bench_server_fuzz --requests 10000 --profiles all \\
        --output benchmarks/results/server_fuzz_soak.json

``--combine`` merges the ``--output`` files of runs made side by side (one profile each, the
i-th with ``--seed i``) into the result ``--profiles all`` would write.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from benchmarks.harness.common import result_header
from benchmarks.harness.fuzz_model import write_fuzz_model
from benchmarks.harness.server_fuzz import PROFILES, fuzz, profile_args
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
    p.add_argument(
        "--profiles", default="chunk256",
        help=f"server configurations, comma-separated, or all ({', '.join(PROFILES)})",
    )  # fmt: skip
    p.add_argument(
        "--combine", nargs="+", default=None, metavar="JSON",
        help="instead of fuzzing, combine the --output files of runs (one profile each, e.g. "
        "run side by side) into one result",
    )  # fmt: skip
    p.add_argument("--log-dir", default="out/server_logs", help="the started server's log")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def _run_profile(args, name: str, seed: int, requests: int) -> dict:
    server_args = profile_args(name)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_fuzz_model(Path(tmp) / "fuzz_model")
        log = Path(args.log_dir) / f"fuzz_{name}_seed{seed}.log"
        with ServerProcess(model, server_args, log) as server:
            result = fuzz(server, seed, requests, args.concurrency)
    return {"profile": name} | result | {"server_args": server_args}


def _combine(runs: list[dict]) -> dict:
    """Totals over profiles (counts summed, problems prefixed with their profile)."""
    if len(runs) == 1:
        return runs[0]
    total: dict = {"seed": runs[0]["seed"], "concurrency": runs[0]["concurrency"]}
    total["seconds"] = round(sum(r["seconds"] for r in runs), 1)
    total["server_alive"] = all(r["server_alive"] for r in runs)
    total["requests"] = sum(r["requests"] for r in runs)
    for key in ("by_kind", "by_result", "by_kind_and_result", "errors", "leaks", "log"):
        counts = Counter()
        for r in runs:
            counts.update(r[key])
        total[key] = dict(sorted(counts.items()))
    total["client_aborts"] = sum(r["client_aborts"] for r in runs)
    total["problems"] = [f"{r['profile']}: {p}" for r in runs for p in r["problems"]]
    total["profiles"] = runs
    return total


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    header = result_header(argv, "cpu")
    names = list(PROFILES) if args.profiles == "all" else args.profiles.split(",")
    for name in names:
        profile_args(name)  # unknown names fail before any server starts
    if args.combine:
        runs = [json.loads(Path(f).read_text()) for f in args.combine]
        result = _combine([r["profiles"][0] if "profiles" in r else r for r in runs])
        result["parts"] = [{k: r[k] for k in ("command", "git_commit")} for r in runs]
    elif args.url:
        server = ServerProcess("unused", [], Path(args.log_dir) / "unused.log")
        server.url = args.url.rstrip("/")
        result = fuzz(server, args.seed, args.requests, args.concurrency)
    else:
        share, extra = divmod(args.requests, len(names))
        runs = []
        for i, name in enumerate(names):
            runs.append(_run_profile(args, name, args.seed + i, share + (i < extra)))
            print(f"{name}: {_table(runs[-1]).splitlines()[-1]}", flush=True)
        result = _combine(runs)
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
