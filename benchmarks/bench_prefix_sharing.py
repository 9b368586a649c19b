"""With prefix sharing on, how many agent branches decode at once per KV pool, through SGLang's
real scheduler? (CPU; SGLang's own admission, retraction, allocation and radix tree.)

Each pool (fp16 and fp8 e4m3 at page size 1 and 128, KVarN presets) is sized by bytes for a
model shape and GPU budget (``benchmarks.harness.pools``) and serves the same seeded workload
(``benchmarks.harness.workloads``) through ``benchmarks.harness.sglang_sched.SchedServer``:
SGLang 0.5.23's ``PrefillAdder``/``SchedulePolicy`` (FCFS), chunked prefill, ``retract_decode``,
allocation and ``UnifiedRadixCache``, driven without a model; output lengths vary per request
and are unknown to the scheduler (``max_new_tokens`` above them, a stop token ends each).
Reported per pool: tokens the pool holds and holds on average, the decode batch (mean, p50, p99:
branches decoding at once; and its mean over the decode steps during which requests were
waiting, when memory and ``--max-running-requests``, not the workload, set it), the cached-token
rate (SGLang's ``cached_tokens`` / prompt tokens), prompt tokens re-prefilled because their
prefix had been evicted (an unbounded radix cache would have matched them), retractions and
aborted requests, time to first token of a new branch in steps (forward passes from ready to
first token), and for KVarN the fp16 slots (total, peak, mean held, mean held by cached sinks,
evictions by sink, admissions that waited for slots) and pages quantized against full pages
written (each exactly once: asserted). After every run the pool is checked for leaks
(``check_no_leak``).

``--kvarn-sinkhorn-iters`` (default 0) sets the benchmark quantizer's variance-normalization
iterations: bytes, commits and slots are the preset's, the random K/V are never read, and 0
iterations make the CPU reference quantizer about 10x cheaper. ``PRESET@N``: ``--kvarn-slots
N``. ``--plot`` writes the decode batch and the fp16 slot use over time.

    python -m benchmarks.bench_prefix_sharing --output benchmarks/results/prefix_sharing.json
    python -m benchmarks.bench_prefix_sharing --smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import asdict

import torch

from benchmarks.harness.common import result_header, write_result
from benchmarks.harness.pools import ModelShape, make_pool
from benchmarks.harness.prefix_sharing_report import plot, table
from benchmarks.harness.sched_context import scheduler_context, write_llama_config
from benchmarks.harness.sglang_sched import SchedServer, check_no_leak
from benchmarks.harness.workloads import WORKLOADS, describe, make_workload
from kvarn_sglang.eval.provenance import versions

PLOTTED = ("decode_batch", "slots_held", "cached_sink_slots", "tokens_used")
DEFAULT_POOLS = (
    "fp16-p1,fp16-p128,fp8-p1,fp8-p128,k4v2_g128,k4v2_g128@257,k4v2_g128@544,k4v4_g128,k2v2_g128"
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="agentic")
    p.add_argument("--pools", default=DEFAULT_POOLS)
    p.add_argument("--tasks", type=int, default=None, help="per workload (default 128, 256, 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--budget-gb", type=float, default=40.0, help="GPU KV budget, 1e9 bytes")
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--max-prefill-tokens", type=int, default=16384)
    p.add_argument("--chunked-prefill-size", type=int, default=8192)
    p.add_argument("--max-new-tokens", type=int, default=256, help="what clients ask for")
    p.add_argument("--kvarn-sinkhorn-iters", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny run: 2 tasks, 2 GB, 4 layers")
    p.add_argument("--output", default=None)
    p.add_argument("--plot", default=None, help="PNG: decode batch and slot use over time")
    args = p.parse_args(argv)
    if args.smoke:
        args.tasks, args.budget_gb, args.layers, args.max_running = 2, 2.0, 4, 32
        args.pools = "fp16-p1,fp8-p128,k4v2_g128"
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            p.error(f"unknown workload {name!r}: expected {WORKLOADS}")
    return args


def _pct(xs: list[float], q: float) -> float:
    return float(torch.tensor(xs, dtype=torch.float64).quantile(q)) if xs else 0.0


def _thin(xs: list, n: int = 400) -> list:
    step = max(1, len(xs) // n)
    return xs[::step]


def run_one(args, workload, pool_name: str, shape: ModelShape, model_dir: str) -> dict:
    from sglang.srt.configs.model_config import ModelConfig

    name, _, slots = pool_name.partition("@")
    pool = make_pool(
        name, shape, int(args.budget_gb * 1e9), args.max_running,
        kvarn_slots=int(slots) if slots else None, sinkhorn_iters=args.kvarn_sinkhorn_iters,
    )  # fmt: skip
    flags = ["--page-size", str(pool.page_size), "--max-running-requests", str(args.max_running),
             "--chunked-prefill-size", str(args.chunked_prefill_size),
             "--max-prefill-tokens", str(args.max_prefill_tokens)]  # fmt: skip
    with scheduler_context(flags, model_dir) as server_args:
        server = SchedServer(
            pool, ModelConfig.from_server_args(server_args), max_running=args.max_running,
            max_context=describe(workload)["max_sequence"] + args.max_new_tokens + 1,
            max_prefill_tokens=args.max_prefill_tokens,
            chunked_prefill_size=args.chunked_prefill_size, max_new_tokens=args.max_new_tokens,
        )  # fmt: skip
        t0 = time.perf_counter()
        server.run(workload.warmup)
        server.reset_stats()
        server.run(workload.roots)
        wall = time.perf_counter() - t0
        check_no_leak(server)
    s, series = server.stats, server.series
    if pool.config is not None:
        assert s["pages_quantized"] == s["pages_completed"], "pages not quantized exactly once"
    batch, ttft, waiting = (
        series["decode_batch"],
        series["ttft_steps"],
        series["decode_batch_waiting"],
    )
    row = {
        "pool": pool_name, "page_size": pool.page_size, "bytes_per_token": pool.cell_bytes,
        "token_capacity": pool.token_capacity, "fp16_slots": pool.num_slots,
        "slot_pool_bytes": pool.num_slots * pool.slot_bytes,
        "resident_tokens_mean": statistics.fmean(series["tokens_used"]),
        "decode_batch_mean": statistics.fmean(batch) if batch else 0.0,
        "decode_batch_p50": _pct(batch, 0.5), "decode_batch_p99": _pct(batch, 0.99),
        "decode_batch_waiting_mean": statistics.fmean(waiting) if waiting else 0.0,
        "decode_steps_waiting": len(waiting),
        "cached_token_rate": s["cached_tokens"] / max(1, s["prompt_tokens"]),
        "ttft_steps_mean": statistics.fmean(ttft) if ttft else 0.0,
        "ttft_steps_p50": _pct(ttft, 0.5), "ttft_steps_p99": _pct(ttft, 0.99),
        "evicted_tokens": server.tree.evicted, "wall_s": round(wall, 1), **s,
        "series": {k: _thin(v) for k, v in series.items() if k in PLOTTED},
    }  # fmt: skip
    if pool.config is not None:
        held, cached = series["slots_held"], series["cached_sink_slots"]
        row |= {
            "slot_peak": max(held), "slots_held_mean": statistics.fmean(held),
            "cached_sink_slots_mean": statistics.fmean(cached),
            "cached_sink_slots_peak": max(cached),
            "sink_evictions": server.alloc.sink_evictions,
            "admissions_waited_for_slots": server.alloc.admissions_waited_for_slots,
            # Not holding slots for cached prefixes: what it would save and cost.
            "no_cached_sinks_saves_tokens": round(
                statistics.fmean(cached) * pool.slot_bytes / pool.cell_bytes
            ),
            "no_cached_sinks_recomputes_tokens": s["sink_hits"] * pool.page_size,
        }  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(1)
    shape = ModelShape(args.layers, args.kv_heads, args.head_dim)
    default_tasks = {"agentic": 128, "chat": 256, "docqa": 48}
    rows, workloads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_llama_config(
            tmp, layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim
        )
        for wname in args.workloads.split(","):
            workload = make_workload(wname, args.tasks or default_tasks[wname], args.seed)
            workloads.append(describe(workload))
            for pool_name in args.pools.split(","):
                row = {"workload": wname, **run_one(args, workload, pool_name, shape, model_dir)}
                rows.append(row)
                print(f"{wname} {pool_name}: {row['wall_s']} s", file=sys.stderr)
    print(table(rows))
    if args.plot:
        plot(rows, args.plot)
    body = {
        "model_shape": asdict(shape), "budget_bytes": int(args.budget_gb * 1e9),
        "max_running_requests": args.max_running, "max_prefill_tokens": args.max_prefill_tokens,
        "chunked_prefill_size": args.chunked_prefill_size, "max_new_tokens": args.max_new_tokens,
        "kvarn_sinkhorn_iters": args.kvarn_sinkhorn_iters, "workloads": workloads, "rows": rows,
    }  # fmt: skip
    header = result_header(argv, "cpu")
    header["versions"] |= versions("sglang")
    write_result(args.output, header, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
