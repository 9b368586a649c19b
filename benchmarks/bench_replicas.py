"""Two KVarN replicas behind ``sglang_router``: how much of the agentic workload's prompts hit a
replica's prefix cache with the router's cache-aware policy, against round robin?

Two identical ``--kv-cache kvarn`` servers (SmolLM2-135M on this machine's CPU engine) sit
behind ``python -m sglang_router.launch_router --worker-urls A B --policy P``. For each policy
the replicas' prefix caches are flushed, the router is started with that policy, and the same
seeded agentic multi-branch workload (``benchmarks.harness.workloads``: agents' system
prompts, tasks that fork into parallel samples, tree search and retries) is served through the
router in a closed loop (``benchmarks.harness.server_workload.run_workload``). Reported per
policy: the prefix-cache hit rate (SGLang's ``cached_tokens`` over prompt tokens, summed over
requests), generated and prompt tokens per second, latency p50/p99, and how the requests
split between the replicas; then every page and fp16 slot of both replicas is checked free.

    python -m benchmarks.bench_replicas --output benchmarks/results/replicas_cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness.common import result_header, write_result
from benchmarks.harness.pd_fleet import Router
from benchmarks.harness.server_process import (
    SMOLLM2_HF,
    ServerProcess,
    http,
    start_together,
    wait_until_flushed,
)
from benchmarks.harness.server_workload import flush_and_count, run_workload, summarize
from benchmarks.harness.workloads import describe, make_workload

KVARN_ARGS = [
    "--kv-cache", "kvarn", "--page-size", "128", "--max-total-tokens", "131072",
    "--max-running-requests", "8", "--skip-server-warmup", "--random-seed", "0",
    "--enable-cache-report",
]  # fmt: skip


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", default="cache_aware,round_robin")
    p.add_argument("--tasks", type=int, default=6)
    p.add_argument("--scale", type=float, default=0.125, help="length scale of the workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--output", default=None)
    return p.parse_args(argv)


def _served(server: ServerProcess) -> int:
    """Requests the server has answered (``/generate`` lines of its log)."""
    return server.log_text().count('"POST /generate HTTP/1.1" 200')


def run_policy(policy: str, replicas: list[ServerProcess], args, logs: Path) -> dict:
    for server in replicas:
        wait_until_flushed(server.url)
    vocab = http(f"{replicas[0].url}/model_info").get("vocab_size") or 49152
    workload = make_workload("agentic", args.tasks, args.seed, vocab=int(vocab), scale=args.scale)
    served = [_served(s) for s in replicas]
    with Router.replicas(replicas, policy, logs / f"router_{policy}.log") as router:
        started = time.perf_counter()
        rows = run_workload(router.url, workload, args.concurrency)
        result = summarize(rows, time.perf_counter() - started)
    result["prompt_tokens_per_s"] = result["prompt_tokens"] / result["seconds"]
    result["requests_per_replica"] = [_served(s) - n for s, n in zip(replicas, served, strict=True)]
    result["after_flush"] = [flush_and_count(s.url) for s in replicas]
    print(
        f"{policy}: hit rate {result['cached_token_rate']:.1%}, "
        f"{result['generated_tokens_per_s']:.2f} generated tok/s, "
        f"split {result['requests_per_replica']}", file=sys.stderr,
    )  # fmt: skip
    return result


def table(results: dict[str, dict]) -> str:
    lines = [
        "| policy | requests (per replica) | prompt tokens | cached | hit rate | generated tok/s "
        "| prompt tok/s | latency p50 / p99 | leaked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for policy, r in results.items():
        leaked = sum(a["leaked"] for a in r["after_flush"])
        split = "/".join(str(n) for n in r["requests_per_replica"])
        lines.append(
            f"| {policy} | {r['requests']} ({split}) | {r['prompt_tokens']:,} "
            f"| {r['cached_tokens']:,} | {r['cached_token_rate']:.1%} "
            f"| {r['generated_tokens_per_s']:.2f} | {r['prompt_tokens_per_s']:.0f} "
            f"| {r['latency_p50_s']:.1f} s / {r['latency_p99_s']:.1f} s | {leaked} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    logs = Path(tempfile.mkdtemp(prefix="bench_replicas_"))
    replicas = [ServerProcess(SMOLLM2_HF, KVARN_ARGS, logs / f"replica{i}.log") for i in range(2)]
    with start_together(*replicas):
        vocab = http(f"{replicas[0].url}/model_info").get("vocab_size") or 49152
        shape = describe(make_workload("agentic", args.tasks, args.seed, vocab=int(vocab),
                                       scale=args.scale))  # fmt: skip
        results = {p: run_policy(p, replicas, args, logs) for p in args.policies.split(",")}
    print(table(results))
    body = {
        "model": "SmolLM2-135M",
        "replicas": 2,
        "server_args": KVARN_ARGS,
        "workload_shape": shape,
        "concurrency": args.concurrency,
        "results": results,
    }
    write_result(args.output, result_header(argv, "cpu"), body)
    failed = sum(sum(r["failed"].values()) for r in results.values())
    leaked = sum(a["leaked"] for r in results.values() for a in r["after_flush"])
    return 1 if failed or leaked else 0


if __name__ == "__main__":
    sys.exit(main())
