"""What does committing pages (quantize on write) cost per decode step?

Times ``kernels/commit.py`` for a model shape (default Llama-3-8B: 32 layers, 8 KV heads,
head_dim 128, G 128). In steady-state decode every request fills one page every G steps, so
a batch of B requests commits B/G pages per layer per step on average; the amortized cost
per step is ``time(commit B pages) * layers / G``. It is compared with KVarN decode attention
for the same batch (all layers) and with reading the model's fp16 weights once (a lower
bound on a decode step).

It also times the attention part of a decode step (all layers) that completes ``B/G`` pages
(at least one): without a commit, with the commit in line before each layer's attention (the
order before the commit moved off the critical path), and with the commit after attention on
a side stream joined at the end of the step (what the backend does now).

    python -m benchmarks.bench_commit --output benchmarks/results/commit_h100.json
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from benchmarks.harness.common import hbm_peak_gbs, result_header, time_fn, write_result
from benchmarks.harness.random_store import random_store
from kvarn_sglang.format.config import get_preset
from kvarn_sglang.kernels.commit import commit_pages
from kvarn_sglang.kernels.decode import decode_attention


def decode_step_us(cache, table, lens, q, cfg, layers: int, pages: int, args) -> dict:
    """Microseconds of ``layers`` decode attentions with ``pages`` pages committed per layer
    from the fp16 slots in place: none, in line before attention, or after it on a side
    stream (joined at the end)."""
    dev = q.device
    page_ids = torch.arange(1, pages + 1, device=dev)
    slots = torch.zeros(pages, dtype=torch.long, device=dev)
    side = torch.cuda.Stream() if dev.type == "cuda" else None
    d = cfg.head_dim

    def commit():
        commit_pages(
            cache.slot_k, cache.slot_v, cfg, cache.packed, page_ids,
            check_finite=False, skip_row0=True, in_index=slots,
        )  # fmt: skip

    def step(mode: str):
        for _ in range(layers):
            if mode == "inline":
                commit()
            decode_attention(q, cache, table, lens, cfg, d**-0.5)
            if mode == "side" and side is not None:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    commit()
            elif mode == "side":
                commit()
        if mode == "side" and side is not None:
            torch.cuda.current_stream().wait_stream(side)

    return {m: time_fn(partial(step, m), args) for m in ("none", "inline", "side")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--weight-gb", type=float, default=16.06, help="fp16 weights (8B)")
    parser.add_argument("--preset", default="k4v2_g128")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.context, args.layers, args.kv_heads, args.q_heads = "2", 300, 2, 1, 4
        args.warmup, args.iters = 0, 1
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.smoke:
        print("bench_commit needs a GPU (use --smoke for a CPU check)", file=sys.stderr)
        return 1
    cfg = get_preset(args.preset, head_dim=args.head_dim)
    g, hkv, d, dev = cfg.page_size, args.kv_heads, args.head_dim, args.device
    peak = hbm_peak_gbs(dev)
    weight_us = args.weight_gb * 1e9 / (peak * 1e9) * 1e6 if peak else None
    rows = []
    print("| batch | commit us (B pages, 1 layer) | per step us (all layers) | decode attn us "
          "(all layers) | % of attention | % of weight read |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        k = torch.randn(batch, g, hkv, d, dtype=torch.float16, device=dev)
        v = torch.randn_like(k)
        store = torch.empty(batch, hkv, cfg.page_bytes, dtype=torch.uint8, device=dev)
        commit = partial(commit_pages, k, v, cfg, store, check_finite=False)
        commit_us = time_fn(commit, args)
        per_step = commit_us * args.layers / g
        cache, table, lens, _ = random_store(cfg, batch, args.context, hkv, dev, False)
        q = torch.randn(batch, args.q_heads, d, dtype=torch.float16, device=dev)
        attend = partial(decode_attention, q, cache, table, lens, cfg, d**-0.5)
        attn_us = args.layers * time_fn(attend, args)
        pages = max(1, batch // g)
        layers = 1 if args.smoke else args.layers  # the interpreter's commit is slow
        step = decode_step_us(cache, table, lens, q, cfg, layers, pages, args)
        row = {
            "batch": batch,
            "decode_step_attention_us": step,
            "completing_pages": pages,
            "commit_us_one_layer": commit_us,
            "commit_us_per_step": per_step,
            "decode_attention_us_per_step": attn_us,
            "pct_of_attention": 100 * per_step / attn_us,
            "pct_of_weight_read": 100 * per_step / weight_us if weight_us else None,
        }
        rows.append(row)
        wr = f"{row['pct_of_weight_read']:.2f}" if weight_us else "-"
        print(f"| {batch} | {commit_us:.1f} | {per_step:.1f} | {attn_us:.1f} | "
              f"{row['pct_of_attention']:.2f} | {wr} |")  # fmt: skip
    body = {"model_shape": vars(args) | {"device": dev}, "rows": rows}
    write_result(args.output, result_header(argv, dev), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
