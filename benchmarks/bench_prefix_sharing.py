"""With prefix sharing on, how much more agent work fits per KV pool, and does the radix cache
get worse? (CPU; SGLang's real radix cache, allocators and request pool.)

Each pool (fp16, fp8, int8 as upstream runs it, KVarN presets) is sized by bytes for a model
shape and GPU budget (``benchmarks.pools``) and serves the same seeded workload
(``benchmarks.workloads``) through the scheduler-shaped driver of ``benchmarks.radix_sim``.
Reported per pool: peak concurrently running branches (generating requests), cache hit rate
(matched prefix tokens / prompt tokens), prompt tokens re-prefilled because their prefix had
been evicted, evicted tokens, retractions, decode steps to finish the workload, KVarN pages
quantized against full pages written (each exactly once: asserted), the fp16 slot peak, and
bytes per resident token at the running peak (KV bytes in use, fp16 slots included, / distinct
tokens stored in the tree and the running requests). After every run the pool is checked for
leaks (``check_no_leak``).

``--kvarn-sinkhorn-iters`` (default 0) sets the variance-normalization iterations of the
benchmark's KVarN quantizer: the page bytes, commits and slots are the preset's, the random K/V
are never read, and 0 iterations make the CPU reference quantizer about 10x cheaper. A pool
name ``PRESET@N`` runs the preset with ``--kvarn-slots N``.

    python -m benchmarks.bench_prefix_sharing --output benchmarks/results/prefix_sharing.json
    python -m benchmarks.bench_prefix_sharing --smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

import torch

from benchmarks.common import result_header, write_result
from benchmarks.pools import ModelShape, make_pool
from benchmarks.radix_sim import Server, check_no_leak
from benchmarks.workloads import WORKLOADS, describe, make_workload
from kvarn_sglang.provenance import versions

DEFAULT_POOLS = "fp16,fp8,int8,k4v2_g128,k4v2_g128@288,k4v4_g128,k2v2_g128"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="agentic,chat,docqa")
    p.add_argument("--pools", default=DEFAULT_POOLS)
    p.add_argument("--tasks", type=int, default=None, help="per workload (default 128, 256, 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--budget-gb", type=float, default=40.0, help="GPU KV budget, 1e9 bytes")
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--max-prefill-tokens", type=int, default=16384)
    p.add_argument("--kvarn-sinkhorn-iters", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny run: 2 tasks, 2 GB, 4 layers")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.tasks, args.budget_gb, args.layers, args.max_running = 2, 2.0, 4, 32
        args.pools = "fp16,int8,k4v2_g128"
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            p.error(f"unknown workload {name!r}: expected {WORKLOADS}")
    return args


def run_one(args, workload, pool_name: str, shape: ModelShape) -> dict:
    name, _, slots = pool_name.partition("@")
    pool = make_pool(
        name, shape, int(args.budget_gb * 1e9), args.max_running,
        kvarn_slots=int(slots) if slots else None, sinkhorn_iters=args.kvarn_sinkhorn_iters,
    )  # fmt: skip
    info = describe(workload)
    server = Server(
        pool,
        max_running=args.max_running,
        max_context=info["max_sequence"] + 1,
        max_prefill_tokens=args.max_prefill_tokens,
    )
    t0 = time.perf_counter()
    s = server.run(workload)
    wall = time.perf_counter() - t0
    if pool.config is not None:
        assert s["pages_quantized"] == s["pages_completed"], "pages not quantized exactly once"
    check_no_leak(server)
    return {
        "pool": pool_name,
        "page_size": pool.page_size,
        "radix_cache": pool.radix,
        "bytes_per_token": pool.cell_bytes,
        "token_capacity": pool.token_capacity,
        "fp16_slots": pool.num_slots,
        "slot_pool_bytes": pool.num_slots * pool.slot_bytes,
        "hit_rate": s["hit_tokens"] / s["prompt_tokens"],
        "mean_decode_batch": s["decode_batch_sum"] / max(1, s["decode_steps"]),
        "bytes_per_resident_token": s["bytes_at_peak"] / max(1, s["tokens_at_peak"]),
        "wall_s": round(wall, 1),
        **s,
    }


def _table(rows: list[dict]) -> str:
    head = (
        "| workload | pool | B/token | tokens | x fp16 | peak branches | mean batch | hit % | "
        "re-prefilled | "
        "evicted | retracted | decode steps | pages quantized / full | slot peak / slots | "
        "B/resident token |"
    )
    out = [head, "|" + "---|" * 15]
    base = {r["workload"]: r["token_capacity"] for r in rows if r["pool"] == "fp16"}
    for r in rows:
        ratio = r["token_capacity"] / base[r["workload"]] if r["workload"] in base else 0
        kv = r["fp16_slots"] > 0
        out.append(
            f"| {r['workload']} | {r['pool']} | {r['bytes_per_token']:,} | "
            f"{r['token_capacity']:,} | {ratio:.2f}x | {r['peak_running_branches']} | "
            f"{r['mean_decode_batch']:.1f} | "
            f"{100 * r['hit_rate']:.1f} | {r['reprefilled_tokens']:,} | {r['evicted_tokens']:,} | "
            f"{r['retractions']} | {r['decode_steps']:,} | "
            + (f"{r['pages_quantized']:,} / {r['pages_completed']:,}" if kv else "-")
            + " | "
            + (f"{r['slot_peak']} / {r['fp16_slots']}" if kv else "-")
            + f" | {r['bytes_per_resident_token']:,.0f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(1)
    shape = ModelShape(args.layers, args.kv_heads, args.head_dim)
    default_tasks = {"agentic": 128, "chat": 256, "docqa": 48}
    rows, workloads = [], []
    for wname in args.workloads.split(","):
        workload = make_workload(wname, args.tasks or default_tasks[wname], args.seed)
        workloads.append(describe(workload))
        for pool_name in args.pools.split(","):
            row = {"workload": wname, **run_one(args, workload, pool_name, shape)}
            rows.append(row)
            print(f"{wname} {pool_name}: {row['wall_s']} s", file=sys.stderr)
    print(_table(rows))
    body = {
        "model_shape": asdict(shape),
        "budget_bytes": int(args.budget_gb * 1e9),
        "max_running_requests": args.max_running,
        "max_prefill_tokens": args.max_prefill_tokens,
        "kvarn_sinkhorn_iters": args.kvarn_sinkhorn_iters,
        "workloads": workloads,
        "rows": rows,
    }
    header = result_header(argv, "cpu")
    header["versions"] |= versions("sglang")
    write_result(args.output, header, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
