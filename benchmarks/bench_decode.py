"""How fast is KVarN decode attention against fp16 and fp8 paged decode, per context and batch?

For each context length, batch and GQA ratio (head_dim 128, 8 KV heads by default) it times

* ``kvarn``: ``kernels/decode.py`` over packed pages (sink page and own page fp16);
* ``fp16-paged``: the same kernel with every page read from fp16 slots (a paged fp16 decode
  of identical structure);
* ``fp8-paged``: the same, slots in fp8 e4m3 converted to fp16 as they are read (an fp8 paged
  decode of identical structure; GPU only);
* ``sdpa``: torch SDPA on contiguous fp16 K/V, the no-paging ideal;
* ``sglang-fp8``: SGLang's Triton ``decode_attention_fwd`` on fp8 e4m3 K/V, when sglang
  imports (it does not on the device machine, which has no sglang);
* ``flashinfer``: FlashInfer's paged decode (``BatchDecodeWithPagedKVCacheWrapper``) over fp16
  pages of G tokens, SGLang's default GPU attention: the fp16 baseline, when flashinfer
  imports (the ``sglang`` extra declares it; an error is recorded in the row, not raised);

and prints microseconds, bytes read, effective GB/s, percent of HBM peak and speedup over
fp16-paged. ``--smoke`` runs tiny shapes through the Triton interpreter on CPU (the test
suite uses it so the script cannot rot); real numbers need a GPU:

    python -m benchmarks.bench_decode --output benchmarks/results/decode_h100.json
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

from benchmarks.harness.common import hbm_peak_gbs, result_header, time_fn, write_result
from benchmarks.harness.random_store import random_store
from kvarn_sglang.format.config import get_preset
from kvarn_sglang.format.numerics import PagedKVCache
from kvarn_sglang.kernels.decode import _launch, decode_attention, default_splits


def sglang_decode(q: torch.Tensor, ctx: int, hkv: int, dtype: torch.dtype, args):
    """Time SGLang's Triton ``decode_attention_fwd`` over token-paged K/V of ``dtype``
    (fp16, or fp8 e4m3 with scales 1.0). Returns ``(us, bytes)`` or None without sglang."""
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    except Exception:  # sglang is absent or does not import here
        return None
    batch, hq, d = q.shape
    dev = q.device
    tokens = batch * ctx
    k = torch.randn(tokens + 1, hkv, d, device=dev).to(dtype)
    v = torch.randn(tokens + 1, hkv, d, device=dev).to(dtype)
    order = torch.randperm(tokens, device=dev) + 1
    indptr = torch.arange(0, tokens + 1, ctx, device=dev, dtype=torch.int32)
    splits = 8 if ctx >= 4096 else 2
    logits = torch.empty(batch, hq, splits, d, dtype=torch.float32, device=dev)
    lse = torch.empty(batch, hq, splits, dtype=torch.float32, device=dev)
    num_splits = torch.full((batch,), splits, dtype=torch.int32, device=dev)
    o = torch.empty_like(q)

    def run():
        decode_attention_fwd(
            q, k, v, o, indptr, order.to(torch.int64), logits, lse, num_splits, splits,
            d**-0.5, 1.0, 1.0,
        )  # fmt: skip

    return time_fn(run, args), 2 * tokens * hkv * d * k.element_size()


def flashinfer_decode(q: torch.Tensor, ctx: int, hkv: int, page: int, args):
    """Time FlashInfer's paged decode over fp16 pages ``[P, G, Hkv, D]`` (NHD). Returns
    ``(us, bytes)``, None without flashinfer, or the error's text."""
    try:
        import flashinfer
    except Exception:  # absent here
        return None
    try:
        batch, hq, d = q.shape
        dev = q.device
        per = -(-ctx // page)
        k = torch.randn(batch * per, page, hkv, d, dtype=q.dtype, device=dev)
        v = torch.randn_like(k)
        ws = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws, "NHD", use_tensor_cores=hq // hkv >= 4
        )
        wrapper.plan(
            torch.arange(0, batch * per + 1, per, dtype=torch.int32, device=dev),
            torch.randperm(batch * per, device=dev).int(),
            torch.full((batch,), ctx - (per - 1) * page, dtype=torch.int32, device=dev),
            hq, hkv, d, page, q_data_type=q.dtype, kv_data_type=k.dtype,
        )  # fmt: skip
        us = time_fn(lambda: wrapper.run(q, (k, v)), args)
        return us, 2 * batch * ctx * hkv * d * k.element_size()
    except Exception as err:  # an API or driver mismatch: recorded, not fatal
        return f"{type(err).__name__}: {err}"


def bench_case(ctx: int, batch: int, group: int, args) -> dict:
    dev, hkv, d = args.device, args.kv_heads, args.head_dim
    cfg = get_preset(args.preset, head_dim=d)
    q = torch.randn(batch, hkv * group, d, dtype=torch.float16, device=dev)
    row = {"context": ctx, "batch": batch, "gqa": group}
    fp16_cfg = get_preset(args.preset, head_dim=d, sink_pages=10**9)
    fp16_gib = batch * ctx * hkv * d * 4 / 2**30  # fp16 K and V of the whole batch
    baselines = fp16_gib <= args.max_fp16_gib
    row["baselines_skipped"] = not baselines
    kinds = (("kvarn", False), ("fp16-paged", True))
    for name, all_fp16 in kinds[: 2 if baselines else 1]:
        cache, table, lens, nbytes = random_store(cfg, batch, ctx, hkv, dev, all_fp16)
        use = fp16_cfg if all_fp16 else cfg
        us = time_fn(partial(decode_attention, q, cache, table, lens, use, d**-0.5), args)
        row[name] = {"us": us, "bytes": nbytes, "gbs": nbytes / us / 1e3}
        if all_fp16 and dev == "cuda":  # the same pages in fp8: half the bytes
            fp8 = PagedKVCache(
                cache.packed, cache.slot_k.to(torch.float8_e4m3fn),
                cache.slot_v.to(torch.float8_e4m3fn), cache.page_slot,
            )  # fmt: skip
            del cache
            splits = default_splits(table.shape[1])
            run = partial(_launch, q, fp8, table, lens, fp16_cfg, d**-0.5, splits, q.dtype)
            us = time_fn(run, args)
            row["fp8-paged"] = {"us": us, "bytes": nbytes // 2, "gbs": nbytes / 2 / us / 1e3}
            del fp8
        else:
            del cache
    if dev == "cuda" and baselines:
        k = torch.randn(batch, hkv, ctx, d, dtype=torch.float16, device=dev)
        v = torch.randn_like(k)
        qq = q.view(batch, hkv * group, 1, d)
        kk, vv = (x.repeat_interleave(group, 1) for x in (k, v)) if group > 1 else (k, v)
        us = time_fn(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv), args)
        nbytes = 2 * k.numel() * 2
        row["sdpa"] = {"us": us, "bytes": nbytes, "gbs": nbytes / us / 1e3}
    if dev == "cuda" and baselines:
        timed = flashinfer_decode(q, ctx, hkv, cfg.page_size, args)
        if isinstance(timed, str):
            row["flashinfer_error"] = timed
        elif timed is not None:
            row["flashinfer"] = {
                "us": timed[0],
                "bytes": timed[1],
                "gbs": timed[1] / timed[0] / 1e3,
            }
    fp8 = torch.float8_e4m3fn if dev == "cuda" else torch.float16  # no fp8 in the interpreter
    for name, dtype in (("sglang-fp16", torch.float16), ("sglang-fp8", fp8))[: 2 * baselines]:
        timed = sglang_decode(q, ctx, hkv, dtype, args)
        if timed is not None and (dev == "cuda" or name == "sglang-fp16"):
            us, nbytes = timed
            row[name] = {"us": us, "bytes": nbytes, "gbs": nbytes / us / 1e3}
    peak = hbm_peak_gbs(dev)
    for entry in row.values():
        if isinstance(entry, dict) and peak:
            entry["pct_hbm"] = 100 * entry["gbs"] / peak
    if "fp16-paged" in row:
        row["speedup_vs_fp16_paged"] = row["fp16-paged"]["us"] / row["kvarn"]["us"]
    if "fp8-paged" in row:
        row["speedup_vs_fp8_paged"] = row["fp8-paged"]["us"] / row["kvarn"]["us"]
    if "sglang-fp8" in row:
        row["speedup_vs_sglang_fp8"] = row["sglang-fp8"]["us"] / row["kvarn"]["us"]
    if "flashinfer" in row:
        row["speedup_vs_flashinfer"] = row["flashinfer"]["us"] / row["kvarn"]["us"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="1024,4096,16384,32768,65536,131072")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--gqa", default="8,4")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--preset", default="k4v2_g128")
    parser.add_argument(
        "--max-fp16-gib", type=float, default=16.0, help="no fp16/fp8/SDPA baselines beyond"
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.contexts, args.batches, args.gqa, args.kv_heads = "300", "2", "4", 1
        args.warmup, args.iters = 0, 1
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.smoke:
        print("bench_decode needs a GPU (use --smoke for a CPU check)", file=sys.stderr)
        return 1
    rows = []
    for ctx in map(int, args.contexts.split(",")):
        for batch in map(int, args.batches.split(",")):
            for group in map(int, args.gqa.split(",")):
                rows.append(bench_case(ctx, batch, group, args))
                print_row(rows[-1])
    write_result(args.output, result_header(argv, args.device), {"rows": rows})
    return 0


def print_row(r: dict) -> None:
    if not hasattr(print_row, "header"):
        print(
            "| ctx | batch | gqa | kvarn us | flashinfer us | fp16-paged us | fp8-paged us "
            "| sglang fp8 us | sdpa us | kvarn GB/s | kvarn %HBM | vs flashinfer "
            "| vs fp16-paged | vs fp8-paged |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        print_row.header = True
    sdpa, fp8, sgl8, fi = (
        f"{r[n]['us']:.1f}" if n in r else "-"
        for n in ("sdpa", "fp8-paged", "sglang-fp8", "flashinfer")
    )
    vsfi = f"{r['speedup_vs_flashinfer']:.2f}x" if "speedup_vs_flashinfer" in r else "-"
    vs8 = f"{r['speedup_vs_fp8_paged']:.2f}x" if "speedup_vs_fp8_paged" in r else "-"
    vs16 = f"{r['speedup_vs_fp16_paged']:.2f}x" if "speedup_vs_fp16_paged" in r else "-"
    fp16 = f"{r['fp16-paged']['us']:.1f}" if "fp16-paged" in r else "-"
    pct = f"{r['kvarn'].get('pct_hbm', 0):.0f}" if "pct_hbm" in r["kvarn"] else "-"
    print(
        f"| {r['context']} | {r['batch']} | {r['gqa']} | {r['kvarn']['us']:.1f} | {fi} "
        f"| {fp16} | {fp8} | {sgl8} | {sdpa} "
        f"| {r['kvarn']['gbs']:.0f} | {pct} | {vsfi} "
        f"| {vs16} | {vs8} |"
    )


if __name__ == "__main__":
    sys.exit(main())
