"""What does SGLang's own benchmark client measure against a ``--kv-cache kvarn`` server and an
fp16 server of the same model?

Runs ``python -m sglang.benchmark.serving`` unchanged (``benchmarks.harness.sglang_client``)
against each server, one dataset after the other, the prefix cache flushed before each:

* ``generated-shared-prefix`` (``--backend sglang``): SGLang's prefix-sharing benchmark,
  ``--gsp-*`` sizes from ``--sizes cpu`` (4 groups x 4 prompts, 400-token system prompts,
  32-token questions, 16 output tokens) or ``--sizes gpu`` (SGLang's defaults: 64 x 16, 2,048,
  128, 256);
* ``agentic-trace`` (``--backend sglang-oai-chat``): our seeded agentic workload
  (``benchmarks.harness.workloads``, ``--tasks``, lengths scaled by ``--scale``) written as the
  client's trace JSON with the served model's tokenizer and replayed round by round.

It records SGLang's result JSON of every run (throughput, TTFT, TPOT, ITL, end-to-end latency,
cache hits), each server's KV capacity as its scheduler reports it, and KVarN's pool after a
final flush (every page and fp16 slot free), and prints a markdown table. ``--cpu`` starts the
two servers on this machine one after the other (stock SGLang's CPU engine, SmolLM2-135M, the
main job's flags plus ``--enable-cache-report``); ``--url``/``--fp16-url`` name running
servers, e.g. on a GPU:

    python -m benchmarks.bench_sglang_serving --cpu \\
        --output benchmarks/results/sglang_serving_cpu_smollm2.json
    python -m benchmarks.bench_sglang_serving --url http://gpu:30000 --fp16-url http://gpu:30001 \\
        --sizes gpu --tasks 32 --scale 1 --concurrency 64 \\
        --output benchmarks/results/sglang_serving_<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_server import FP16_CPU_ARGS, KVARN_CPU_ARGS
from benchmarks.harness.server_process import SMOLLM2_HF, ServerProcess, http, wait_until_flushed
from benchmarks.harness.server_workload import flush_and_count, kv_capacity
from benchmarks.harness.sglang_client import (
    CPU_SHARED_PREFIX,
    GPU_SHARED_PREFIX,
    agentic_trace_args,
    client_command,
    run_client,
    write_agentic_trace,
)
from benchmarks.harness.workloads import make_workload
from kvarn_sglang.eval.provenance import git_commit, versions

DATASETS = ("generated-shared-prefix", "agentic-trace")
SIZES = {"cpu": CPU_SHARED_PREFIX, "gpu": GPU_SHARED_PREFIX}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server started with --kv-cache kvarn")
    where.add_argument("--cpu", action="store_true", help="start KVarN and fp16 servers here")
    p.add_argument("--fp16-url", default=None, help="an fp16 server of the same model")
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated")
    p.add_argument("--sizes", default="cpu", choices=sorted(SIZES), help="generated-shared-prefix")
    p.add_argument("--tasks", type=int, default=1, help="agentic tasks of the trace")
    p.add_argument("--scale", type=float, default=0.125, help="length scale of the trace")
    p.add_argument("--concurrency", type=int, default=4, help="client --max-concurrency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="out/server_logs", help="server logs with --cpu")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    unknown = set(args.datasets) - set(DATASETS)
    if unknown:
        p.error(f"unknown datasets {sorted(unknown)}: expected some of {DATASETS}")
    return args


def _runs(args: argparse.Namespace, url: str, workdir: Path) -> dict:
    """Every dataset of ``args`` against the server at ``url``."""
    out = {}
    workdir.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        wait_until_flushed(url)
        output_file = workdir / "client.jsonl"
        if dataset == "generated-shared-prefix":
            sizes = SIZES[args.sizes]
            sent, extra = sizes.groups * sizes.prompts_per_group, {}
            command = client_command(
                url, sizes.args(), output_file,
                concurrency=args.concurrency, seed=args.seed,
            )  # fmt: skip
        else:
            info = http(f"{url}/model_info")
            tokenizer = info.get("tokenizer_path") or info["model_path"]
            workload = make_workload(
                "agentic", args.tasks, args.seed, vocab=int(info.get("vocab_size") or 32000),
                scale=args.scale,
            )  # fmt: skip
            trace = workdir / "agentic_trace.json"
            meta = write_agentic_trace(workload, tokenizer, trace)
            sent, extra = meta["rounds"], {"trace": meta}
            output_len = max(1, round(64 * args.scale))  # the workload's mean reply, scaled
            command = client_command(
                url, agentic_trace_args(trace, meta["conversations"], output_len), output_file,
                backend="sglang-oai-chat", concurrency=args.concurrency, seed=args.seed,
            )  # fmt: skip
        print(f"{url}: sglang.benchmark.serving --dataset-name {dataset} ...", file=sys.stderr)
        result = run_client(command)
        out[dataset] = {**result, "requests": sent, "failed": sent - result["completed"], **extra}
    return out


def _table(result: dict) -> str:
    lines = [
        "| server | dataset | requests | failed | input tokens | cached | output tok/s "
        "| TTFT p50 ms | TPOT p50 ms | E2E p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for server, runs in result["runs"].items():
        for dataset, r in runs.items():
            cache = r.get("cache_report") or {}
            lines.append(
                f"| {server} | {dataset} | {r['requests']} | {r['failed']} "
                f"| {cache.get('total_prompt_tokens', r['total_input_tokens']):,} "
                f"| {cache.get('cache_hit_rate_pct', 0):.1f}% | {r['output_throughput']:.2f} "
                f"| {r['median_ttft_ms']:,.0f} | {r['median_tpot_ms']:,.0f} "
                f"| {r['median_e2e_latency_ms']:,.0f} |"
            )
    cap = result["capacity"]
    if "ratio" in cap:
        lines.append(f"\nKVarN holds {cap['ratio']:.2f}x the fp16 server's tokens per GiB of KV.")
    idle = result["after_flush"]
    lines.append(
        f"After the runs and a flush: {idle['slots_free']}/{idle['slots_total']} fp16 slots and "
        f"{idle['pages_free']}/{idle['pages_total']} pages free ({idle['leaked']} leaked)."
    )
    return "\n".join(lines)


def _serve(args: argparse.Namespace, name: str, url: str, workdir: Path) -> dict:
    """One server: its capacity, every dataset's run, and (KVarN) its pool after a flush."""
    out = {"capacity": kv_capacity(url), "runs": _runs(args, url, workdir / name)}
    if name == "kvarn":
        out["after_flush"] = flush_and_count(url)
    return out


def _merge(served: dict) -> dict:
    cap = {name: s["capacity"] for name, s in served.items()}
    if "fp16" in cap:
        cap["ratio"] = cap["kvarn"]["tokens_per_gib"] / cap["fp16"]["tokens_per_gib"]
    return {
        "capacity": cap,
        "runs": {name: s["runs"] for name, s in served.items()},
        "after_flush": served["kvarn"]["after_flush"],
    }


def measure(args: argparse.Namespace, kvarn_url: str, fp16_url: str | None) -> dict:
    urls = {"kvarn": kvarn_url} | ({"fp16": fp16_url} if fp16_url else {})
    with tempfile.TemporaryDirectory(prefix="bench-sglang-serving-") as tmp:
        return _merge({name: _serve(args, name, url, Path(tmp)) for name, url in urls.items()})


def measure_cpu(args: argparse.Namespace) -> dict:
    """Start the KVarN server, then the fp16 server, on this machine (one at a time: the
    client's numbers are the server's alone, and the memory peak is one server's)."""
    logs = Path(args.log_dir)
    report = ["--enable-cache-report"]  # cached tokens in /v1/chat/completions usage
    flags = {"kvarn": KVARN_CPU_ARGS + report, "fp16": FP16_CPU_ARGS + report}
    served = {}
    with tempfile.TemporaryDirectory(prefix="bench-sglang-serving-") as tmp:
        for name, server_args in flags.items():
            print(f"starting the {name} server on the CPU (log in {logs})", file=sys.stderr)
            with ServerProcess(SMOLLM2_HF, server_args, logs / f"{name}.log") as server:
                served[name] = _serve(args, name, server.url, Path(tmp))
    return _merge(served)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    header = {
        "command": " ".join(["python -m benchmarks.bench_sglang_serving", *(argv or sys.argv[1:])]),
        "git_commit": git_commit(),
        "versions": versions("torch", "sglang", "transformers"),
    }
    if args.cpu:
        result = measure_cpu(args)
        header["device"] = "cpu (stock SGLang CPU engine, sgl_kernel stand-in)"
    else:
        result = measure(args, args.url, args.fp16_url)
        header["device"] = "remote server"
    result = {**header, **result}
    print(_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    failed = sum(r["failed"] for runs in result["runs"].values() for r in runs.values())
    return 1 if failed or result["after_flush"]["leaked"] else 0


if __name__ == "__main__":
    sys.exit(main())
