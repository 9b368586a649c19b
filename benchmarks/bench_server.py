"""How does an SGLang server with ``--kv-cache kvarn`` serve an agentic multi-branch workload?

The client is the same for any server: ``--url`` names a running one (for example a GPU server
started with ``python -m sglang.launch_server --model-path M --kv-cache kvarn --page-size
128``, with ``--fp16-url`` an fp16 server of the same model to compare with). ``--cpu`` starts
both on this machine instead: stock SGLang on its CPU engine (``benchmarks.server_process``),
SmolLM2-135M as ``scripts/setup_env.sh`` exported it. That is the README's main job.

Reported:

* **capacity**: KV tokens per GiB of KV memory as each server's scheduler reports them
  (fp16 slots of the KVarN pool counted), KVarN against fp16;
* **workload** (``benchmarks.workloads``, seeded; lengths scaled by ``--scale``): requests sent
  in a closed loop (a turn is sent when its parent answered, with the parent's real output
  in its prompt, the way an agent framework does), at most ``--concurrency`` at once;
  prompt, cached and generated tokens, the cached-token rate, generated tokens per second,
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
import statistics
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from benchmarks.server_process import (
    SMOLLM2_HF,
    ServerProcess,
    http,
    start_together,
    wait_until_flushed,
)
from benchmarks.workloads import WORKLOADS, Spec, Workload, describe, make_workload
from kvarn_sglang.provenance import git_commit, versions

KVARN_CPU_ARGS = [
    "--kv-cache", "kvarn", "--page-size", "128", "--max-total-tokens", "262144",
    "--max-running-requests", "16", "--sleep-on-idle", "--skip-server-warmup",
]  # fmt: skip
FP16_CPU_ARGS = [
    "--attention-backend", "torch_native", "--max-total-tokens", "65536",
    "--max-running-requests", "16", "--sleep-on-idle", "--skip-server-warmup",
]  # fmt: skip


@dataclass
class RequestRow:
    sid: int
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    seconds: float
    error: str | None = None


def capacity(kvarn_url: str, fp16_url: str | None) -> dict:
    """KV tokens per GiB of each server's KV memory (SGLang's own accounting)."""

    def per_gib(url: str) -> dict:
        state = http(f"{url}/get_server_info")["internal_states"][0]
        memory = state["memory_usage"]
        row = {"tokens": memory["token_capacity"], "kv_gib": memory["kvcache"]}
        row["tokens_per_gib"] = row["tokens"] / row["kv_gib"]
        if "kvarn" in state:
            row["kvarn"] = state["kvarn"]
        return row

    out = {"kvarn": per_gib(kvarn_url)}
    if fp16_url:
        out["fp16"] = per_gib(fp16_url)
        out["ratio"] = out["kvarn"]["tokens_per_gib"] / out["fp16"]["tokens_per_gib"]
    return out


def run_workload(url: str, workload: Workload, concurrency: int) -> list[RequestRow]:
    """Serve ``workload`` in a closed loop; a request's prompt is its parent's prompt and
    real output followed by its own segment."""
    sequences: dict[int, list[int]] = {}
    lock = threading.Lock()

    def send(spec: Spec) -> RequestRow:
        with lock:
            prompt = (sequences[spec.parent.sid] if spec.parent else []) + list(spec.segment)
        payload = {
            "input_ids": prompt,
            "sampling_params": {
                "max_new_tokens": max(1, spec.gen_len), "temperature": 0.0, "ignore_eos": True,
            },
        }  # fmt: skip
        started = time.perf_counter()
        try:
            answer = http(f"{url}/generate", payload)
        except Exception as err:  # a failed request is counted, and its subtree is dropped
            return RequestRow(spec.sid, len(prompt), 0, 0, 0.0, type(err).__name__)
        meta = answer["meta_info"]
        generated = answer["output_ids"] if spec.gen_len else []
        with lock:
            sequences[spec.sid] = prompt + generated
        return RequestRow(
            spec.sid, meta["prompt_tokens"], meta.get("cached_tokens", 0),
            len(generated), time.perf_counter() - started,
        )  # fmt: skip

    for spec in workload.warmup:  # a long-running server has these cached
        send(spec)
    rows, ready = [], deque(workload.roots)
    with ThreadPoolExecutor(concurrency) as pool:
        running: dict = {}
        while ready or running:
            while ready and len(running) < concurrency:
                spec = ready.popleft()
                running[pool.submit(send, spec)] = spec
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                spec, row = running.pop(future), future.result()
                rows.append(row)
                if row.error is None:
                    ready.extend(spec.children)
    return rows


def summarize(rows: list[RequestRow], seconds: float) -> dict:
    ok = [r for r in rows if r.error is None]
    latencies = sorted(r.seconds for r in ok) or [0.0]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    generated = sum(r.generated_tokens for r in ok)
    return {
        "requests": len(rows),
        "failed": dict(Counter(r.error for r in rows if r.error)),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_token_rate": cached / prompt if prompt else 0.0,
        "generated_tokens": generated,
        "seconds": seconds,
        "generated_tokens_per_s": generated / seconds,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def input_logprobs(url: str, ids: list[int]):
    """The server's log-probability of every prompt token after the first (one prefill)."""
    import torch

    answer = http(
        f"{url}/generate",
        {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
         "return_logprob": True, "logprob_start_len": 0},
    )  # fmt: skip
    return torch.tensor([lp for lp, _, _ in answer["meta_info"]["input_token_logprobs"][1:]])


def teacher_forced_agreement(
    kvarn_url: str, fp16_url: str, model_path: str | Path, ids: list[int], preset: str
) -> dict:
    """Mean |d logprob| of the KVarN server against ``kvarn-sglang eval``'s KVarN forward
    (``to_eval_kvarn``) and unquantized forward (``to_eval_fp16``), next to the fp16
    server's against the unquantized forward (``floor``: what the engines differ by without
    quantization), and the mean NLL of each (teacher-forced, one prefill each)."""
    import torch

    from kvarn_sglang.baselines import get_method
    from kvarn_sglang.eval_attention import paged_logits
    from kvarn_sglang.models import load_model

    server = {"kvarn": input_logprobs(kvarn_url, ids), "fp16": input_logprobs(fp16_url, ids)}
    model, _ = load_model(str(model_path), dtype=torch.float32)
    head_dim = model.config.head_dim
    targets = torch.tensor([ids])[:, 1:].T
    evals = {}
    for name, method in (("fp16", None), ("kvarn", get_method(preset, head_dim=head_dim))):
        logits = paged_logits(model, torch.tensor([ids]), method, sink_pages=1)
        evals[name] = torch.log_softmax(logits, -1)[:-1].gather(1, targets)[:, 0]
    return {
        "tokens": len(ids),
        "floor": float((server["fp16"] - evals["fp16"]).abs().mean()),
        "to_eval_kvarn": float((server["kvarn"] - evals["kvarn"]).abs().mean()),
        "to_eval_fp16": float((server["kvarn"] - evals["fp16"]).abs().mean()),
        "nll": {f"server_{k}": float(-v.mean()) for k, v in server.items()}
        | {f"eval_{k}": float(-v.mean()) for k, v in evals.items()},
    }


def flush_and_count(url: str) -> dict:
    """Flush the prefix cache once the server is idle; the KVarN pool's counts after it."""
    wait_until_flushed(url)
    state = http(f"{url}/get_server_info")["internal_states"][0]["kvarn"]
    return {
        "slots_free": state["slots_free"],
        "slots_total": state["slots_total"],
        "pages_free": state["pages_free"],
        "pages_total": state["pages_total"],
        "leaked": (state["slots_total"] - state["slots_free"])
        + (state["pages_total"] - state["pages_free"]),
    }


def format_report(result: dict) -> str:
    cap, load = result["capacity"], result["workload"]
    lines = ["| KV cache | tokens | KV GiB | tokens per GiB |", "|---|---|---|---|"]
    for name in ("fp16", "kvarn"):
        if name in cap:
            row = cap[name]
            tokens, gib, per_gib = row["tokens"], row["kv_gib"], row["tokens_per_gib"]
            lines.append(f"| {name} | {tokens:,} | {gib:.3f} | {per_gib:,.0f} |")
    if "ratio" in cap:
        lines.append(f"\nKVarN holds **{cap['ratio']:.2f}x** the fp16 server's tokens per GiB.")
    lines += [
        "",
        "| requests | failed | prompt tokens | cached | cached rate | generated | tokens/s "
        "| latency p50 / p99 |",
        "|---|---|---|---|---|---|---|---|",
        f"| {load['requests']} | {sum(load['failed'].values())} | {load['prompt_tokens']:,} "
        f"| {load['cached_tokens']:,} | {load['cached_token_rate']:.1%} "
        f"| {load['generated_tokens']:,} | {load['generated_tokens_per_s']:.1f} "
        f"| {load['latency_p50_s']:.1f} s / {load['latency_p99_s']:.1f} s |",
    ]
    tf = result.get("teacher_forced")
    if tf:
        nll = tf["nll"]
        lines += [
            "",
            f"Teacher-forced, {tf['tokens']} tokens: mean |d logprob| KVarN server vs eval "
            f"KVarN {tf['to_eval_kvarn']:.4f}, vs eval fp16 {tf['to_eval_fp16']:.4f} "
            f"(fp16 server vs eval fp16: {tf['floor']:.4f}); NLL server fp16 "
            f"{nll['server_fp16']:.4f} / KVarN {nll['server_kvarn']:.4f}, eval fp16 "
            f"{nll['eval_fp16']:.4f} / KVarN {nll['eval_kvarn']:.4f}.",
        ]
    idle = result["after_flush"]
    lines.append(
        f"\nAfter the load and a flush: {idle['slots_free']}/{idle['slots_total']} fp16 slots "
        f"and {idle['pages_free']}/{idle['pages_total']} pages free ({idle['leaked']} leaked)."
    )
    return "\n".join(lines)


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


def _measure(args, kvarn_url: str, fp16_url: str | None, model_path) -> dict:
    info = http(f"{kvarn_url}/get_server_info")
    vocab = http(f"{kvarn_url}/model_info").get("vocab_size") or 32000
    workload = make_workload(
        args.workload, args.tasks, args.seed, vocab=int(vocab), scale=args.scale
    )
    shape = describe(workload)
    print(
        f"serving {shape['requests']} requests of the {args.workload} workload "
        f"({shape['prompt_tokens']:,} prompt tokens) ...", file=sys.stderr,
    )  # fmt: skip
    started = time.perf_counter()
    rows = run_workload(kvarn_url, workload, args.concurrency)
    result = {
        "server": {
            "url": kvarn_url,
            "model": info.get("model_path"),
            "version": info.get("version"),
        },
        "workload_shape": shape,
        "capacity": capacity(kvarn_url, fp16_url),
        "workload": summarize(rows, time.perf_counter() - started),
    }
    if model_path and fp16_url:
        from transformers import AutoTokenizer

        from kvarn_sglang.models import read_text

        print("teacher-forced agreement with kvarn-sglang eval ...", file=sys.stderr)
        ids = AutoTokenizer.from_pretrained(model_path)(read_text(None)).input_ids
        result["teacher_forced"] = teacher_forced_agreement(
            kvarn_url, fp16_url, model_path, ids[: args.tf_tokens], args.preset
        )
    result["after_flush"] = flush_and_count(kvarn_url)
    return result


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
            result = _measure(args, kvarn.url, fp16.url, SMOLLM2_HF)
        header["device"] = "cpu (stock SGLang CPU engine, sgl_kernel stand-in)"
    else:
        result = _measure(args, args.url, args.fp16_url, args.model_path)
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
