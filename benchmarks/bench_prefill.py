"""How fast is KVarN prefill over a packed prefix against fp16 prefill of the same shapes?

An agentic turn appends new tokens to a long cached prefix. For each prefix length and number
of new tokens (one request, 8 KV heads, head_dim 128 by default) it times

* ``kvarn``: ``kernels/extend.py`` over packed prefix pages (sink and own pages fp16);
* ``flashinfer``: FlashInfer's paged prefill (``BatchPrefillWithPagedKVCacheWrapper``, fp16
  pages of G tokens; SGLang's default GPU attention), when flashinfer imports;
* ``sglang-triton``: SGLang 0.5.23's Triton ``extend_attention_fwd`` over an fp16 token pool,
  when sglang imports;
* ``sdpa``: torch SDPA on contiguous fp16 K/V, causal from the bottom right (the no-paging
  ideal);

and prints microseconds and the speedup of KVarN over each. ``--smoke`` runs tiny shapes
through the Triton interpreter on CPU (the test suite uses it so the script cannot rot); real
numbers need a GPU:

    python -m benchmarks.bench_prefill --output benchmarks/results/prefill_h100.json
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from benchmarks.harness.common import result_header, time_fn, write_result
from benchmarks.harness.random_store import random_store
from kvarn_sglang.format.config import get_preset
from kvarn_sglang.kernels.extend import extend_attention, extend_blocks


def flashinfer_prefill(q, k, v, prefix: int, page: int):
    """FlashInfer's paged prefill over fp16 pages ``[P, G, Hkv, D]``; None without it."""
    try:
        import flashinfer
    except Exception:  # absent, or no driver
        return None
    dev, (new, hq, d), hkv = q.device, q.shape, k.shape[2]
    pages = k.shape[0]
    ws = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    last = (prefix + new) - (pages - 1) * page
    wrapper.plan(
        torch.tensor([0, new], dtype=torch.int32, device=dev),
        torch.tensor([0, pages], dtype=torch.int32, device=dev),
        torch.arange(pages, dtype=torch.int32, device=dev),
        torch.tensor([last], dtype=torch.int32, device=dev),
        hq, hkv, d, page, causal=True, q_data_type=q.dtype, kv_data_type=k.dtype,
    )  # fmt: skip
    return lambda: wrapper.run(q, (k, v))


def sglang_prefill(q, k_new, pool_k, pool_v, prefix: int):
    """SGLang's Triton extend over an fp16 token pool; None without sglang."""
    try:
        from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
    except Exception:
        return None
    dev, new, d = q.device, q.shape[0], q.shape[2]
    o = torch.empty_like(q)
    qo = torch.tensor([0, new], dtype=torch.int32, device=dev)
    kv = torch.tensor([0, prefix], dtype=torch.int32, device=dev)
    idx = torch.arange(prefix, device=dev)
    return lambda: extend_attention_fwd(
        q, k_new, k_new, o, pool_k, pool_v, qo, kv, idx, None, True, None, new, 1.0, 1.0,
        sm_scale=d**-0.5,
    )  # fmt: skip


def bench_case(prefix: int, new: int, group: int, args) -> dict:
    dev, hkv, d = args.device, args.kv_heads, args.head_dim
    cfg = get_preset(args.preset, head_dim=d)
    g, hq, dt = cfg.page_size, hkv * group, torch.float16
    row = {"prefix": prefix, "new": new, "gqa": group}
    q = torch.randn(new, hq, d, dtype=dt, device=dev)
    kn = torch.randn(new, hkv, d, dtype=dt, device=dev)
    cache, table, _, _ = random_store(cfg, 1, prefix + new, hkv, dev, False)
    blocks = extend_blocks([prefix], [new], cfg, group, dev)
    run = partial(
        extend_attention, q, kn, kn, cache, table, [prefix], [new], cfg, d**-0.5, blocks=blocks
    )
    row["kvarn"] = {"us": time_fn(run, args)}
    del cache
    pages = -(-(prefix + new) // g)
    if dev == "cuda":
        kp = torch.randn(pages, g, hkv, d, dtype=dt, device=dev)
        try:  # an API or driver mismatch is recorded, not fatal
            timed = flashinfer_prefill(q, kp, torch.randn_like(kp), prefix, g)
            if timed is not None:
                row["flashinfer"] = {"us": time_fn(timed, args)}
        except Exception as err:
            row["flashinfer_error"] = f"{type(err).__name__}: {err}"
        del kp
        k = torch.randn(1, hkv, prefix + new, d, dtype=dt, device=dev)
        v = torch.randn_like(k)
        from torch.nn.attention.bias import causal_lower_right

        bias = causal_lower_right(new, prefix + new)
        qq = q.transpose(0, 1)[None]
        sdpa = partial(
            torch.nn.functional.scaled_dot_product_attention,
            qq, k, v, attn_mask=bias, enable_gqa=group > 1,
        )  # fmt: skip
        row["sdpa"] = {"us": time_fn(sdpa, args)}
        del k, v
    pool = torch.randn(max(prefix, 1), hkv, d, dtype=dt, device=dev)
    timed = sglang_prefill(q, kn, pool, torch.randn_like(pool), prefix)
    if timed is not None and (dev == "cuda" or new * (prefix + new) <= 2**16):
        row["sglang-triton"] = {"us": time_fn(timed, args)}
    for name in ("flashinfer", "sglang-triton", "sdpa"):
        if name in row:
            row[f"speedup_vs_{name}"] = row[name]["us"] / row["kvarn"]["us"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefixes", default="4096,32768,131072")
    parser.add_argument("--new", default="1024,8192")
    parser.add_argument("--gqa", default="4,8")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--preset", default="k4v2_g128")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.prefixes, args.new, args.gqa, args.kv_heads = "256", "3", "4", 1
        args.warmup, args.iters = 0, 1
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.smoke:
        print("bench_prefill needs a GPU (use --smoke for a CPU check)", file=sys.stderr)
        return 1
    rows = []
    print("| prefix | new | gqa | kvarn us | flashinfer us | sglang-triton us | sdpa us "
          "| vs flashinfer | vs sglang-triton | vs sdpa |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for prefix in map(int, args.prefixes.split(",")):
        for new in map(int, args.new.split(",")):
            for group in map(int, args.gqa.split(",")):
                r = bench_case(prefix, new, group, args)
                rows.append(r)
                cell = [f"{r[n]['us']:.0f}" if n in r else "-" for n in
                        ("kvarn", "flashinfer", "sglang-triton", "sdpa")]  # fmt: skip
                vs = [f"{r[f'speedup_vs_{n}']:.2f}x" if f"speedup_vs_{n}" in r else "-"
                      for n in ("flashinfer", "sglang-triton", "sdpa")]  # fmt: skip
                print(f"| {prefix} | {new} | {group} | " + " | ".join(cell + vs) + " |")
    write_result(args.output, result_header(argv, args.device), {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
