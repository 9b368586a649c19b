"""How does an SGLang server with ``--kv-cache kvarn`` serve an agentic multi-branch workload?

The client is the same for any server: ``--url`` names a running one (for example a GPU server
started with ``python -m sglang.launch_server --model-path M --kv-cache kvarn --page-size 128``,
with ``--fp16-url`` an fp16 server of the same model to compare with). ``--cpu`` starts both on
this machine instead: stock SGLang on its CPU engine (``benchmarks.harness.server_process``),
SmolLM2-135M as ``scripts/setup_env.sh`` exported it. That is the README's main job.

Reported:

* **capacity**: KV tokens per GiB of KV memory as each server's scheduler reports them
  (fp16 slots of the KVarN pool counted), KVarN against fp16;
* **workload** (``benchmarks.harness.workloads``, seeded; lengths scaled by ``--scale``):
  requests sent in a closed loop (a turn is sent when its parent answered, with the parent's
  real output in its prompt, the way an agent framework does), at most ``--concurrency`` at
  once; prompt, cached and generated tokens, the cached-token rate, generated tokens per second,
  latency p50/p99 and failed requests;
* **teacher-forced agreement** (when the model's files are here: ``--cpu`` or
  ``--model-path``): the KVarN server's prompt log-probabilities of a text against
  ``kvarn-sglang eval``'s quantized forward of the same tokens, next to the floor that the fp16
  server leaves against the eval's unquantized forward;
* **leaks**: after the load and a cache flush, every page and fp16 slot is free.

    bash scripts/main.sh                       # = python -m benchmarks.bench_server --cpu
    python -m benchmarks.bench_server --url http://gpu:30000 --fp16-url http://gpu:30001 \\
        --scale 1 --tasks 32 --output benchmarks/results/server_<gpu>.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness.server_process import SMOLLM2_HF, ServerProcess, start_together
from benchmarks.harness.server_workload import format_report, measure
from benchmarks.harness.workloads import WORKLOADS
from kvarn_sglang.eval.provenance import git_commit, versions

KVARN_CPU_ARGS = [
    "--kv-cache", "kvarn", "--page-size", "128", "--max-total-tokens", "262144",
    "--max-running-requests", "16", "--sleep-on-idle", "--skip-server-warmup",
]  # fmt: skip
FP16_CPU_ARGS = [
    "--attention-backend", "torch_native", "--max-total-tokens", "65536",
    "--max-running-requests", "16", "--sleep-on-idle", "--skip-server-warmup",
]  # fmt: skip


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server started with --kv-cache kvarn")
    where.add_argument("--cpu", action="store_true", help="start KVarN and fp16 servers here")
    p.add_argument("--fp16-url", default=None, help="an fp16 server of the same model")
    p.add_argument("--model-path", default=None, help="the model's files, for the eval side")
    p.add_argument("--preset", default="k4v2_g128", help="the KVarN server's preset")
    p.add_argument("--workload", default="agentic", choices=WORKLOADS)
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--scale", type=float, default=0.125, help="length scale of the workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tf-tokens", type=int, default=640, help="tokens of the teacher-forced text")
    p.add_argument("--log-dir", default="out/server_logs", help="server logs with --cpu")
    p.add_argument("--output", default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    header = {
        "command": " ".join(["python -m benchmarks.bench_server", *(argv or sys.argv[1:])]),
        "git_commit": git_commit(),
        "versions": versions("torch", "sglang", "transformers"),
    }
    if args.cpu:
        logs = Path(args.log_dir)
        kvarn = ServerProcess(SMOLLM2_HF, KVARN_CPU_ARGS, logs / "kvarn.log")
        fp16 = ServerProcess(SMOLLM2_HF, FP16_CPU_ARGS, logs / "fp16.log")
        print(f"starting SGLang on the CPU (logs in {logs}) ...", file=sys.stderr)
        with start_together(kvarn, fp16):
            result = measure(args, kvarn.url, fp16.url, SMOLLM2_HF)
        header["device"] = "cpu (stock SGLang CPU engine, sgl_kernel stand-in)"
    else:
        result = measure(args, args.url, args.fp16_url, args.model_path)
        header["device"] = "remote server"
    result = {**header, **result}
    print(format_report(result))
    if args.output:
        import json

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    failed = sum(result["workload"]["failed"].values())
    return 1 if failed or result["after_flush"]["leaked"] else 0


if __name__ == "__main__":
    sys.exit(main())
