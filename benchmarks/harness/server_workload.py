"""The main job's client: an agentic multi-branch workload served by a running SGLang server.

``measure`` sends the seeded workload of ``workloads`` through the HTTP API in a closed loop
(``run_workload``: a turn is sent when its parent answered, with the parent's real output in
its prompt), and reports the KV capacity against an fp16 server (``capacity``), the cached-
token rate, throughput and latency (``summarize``), the teacher-forced agreement with
``kvarn-sglang eval`` (``teacher_forced_agreement``) and the leak check after a flush
(``flush_and_count``). ``benchmarks/bench_server.py`` is its command line.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness.server_process import http, wait_until_flushed
from benchmarks.harness.workloads import Spec, Workload, describe, make_workload


@dataclass
class RequestRow:
    sid: int
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    seconds: float
    error: str | None = None


def kv_capacity(url: str) -> dict:
    """KV tokens per GiB of one server's KV memory (SGLang's own accounting), and its KVarN
    pool's state if it has one."""
    state = http(f"{url}/get_server_info")["internal_states"][0]
    memory = state["memory_usage"]
    row = {"tokens": memory["token_capacity"], "kv_gib": memory["kvcache"]}
    row["tokens_per_gib"] = row["tokens"] / row["kv_gib"]
    if "kvarn" in state:
        row["kvarn"] = state["kvarn"]
    return row


def capacity(kvarn_url: str, fp16_url: str | None) -> dict:
    """KV tokens per GiB of each server's KV memory (SGLang's own accounting)."""
    out = {"kvarn": kv_capacity(kvarn_url)}
    if fp16_url:
        out["fp16"] = kv_capacity(fp16_url)
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

    from kvarn_sglang.eval.attention import paged_logits
    from kvarn_sglang.eval.models import load_model
    from kvarn_sglang.quant.baselines import get_method

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


def measure(args, kvarn_url: str, fp16_url: str | None, model_path) -> dict:
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

        from kvarn_sglang.eval.models import read_text

        print("teacher-forced agreement with kvarn-sglang eval ...", file=sys.stderr)
        ids = AutoTokenizer.from_pretrained(model_path)(read_text(None)).input_ids
        result["teacher_forced"] = teacher_forced_agreement(
            kvarn_url, fp16_url, model_path, ids[: args.tf_tokens], args.preset
        )
    result["after_flush"] = flush_and_count(kvarn_url)
    return result
