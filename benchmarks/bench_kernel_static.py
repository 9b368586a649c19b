"""What do the kernels cost once compiled for the GPU? Measured on a CPU machine.

Every kernel is compiled through its real launcher (``decode_attention``, ``commit_pages``,
``extend_attention``) for sm_90 (H100/H200) and sm_80 (A100) with Triton's stand-in driver
(``benchmarks.harness.static_compile``), over head_dim, GQA ratio, preset and dtype. For each
compiled kernel it reports registers, spill bytes, shared memory, programs per SM (and which
limit binds), the SASS instruction mix, and

* decode: warp-instructions per page per KV head of the packed-page path and of the fp16-page
  path (static count of the page loop's body, times the warps of a program), next to the time
  HBM takes to deliver that page, under the issue model below;
* commit: warp-instructions per page per KV head (K tile plus V tile, every loop run
  ``sinkhorn_iters`` times);
* extend (prefill): warp-instructions per (query row x page of G keys), a row being one new
  token of one query head, for the packed-page loop and the fp16 loop (static count of the
  loop body, times the warps, times the loop steps a page takes, over the rows a program
  serves); per new token (all query heads of a KV head) it is GROUP times that. Beside it,
  SGLang 0.5.23's own Triton ``extend_attention_fwd`` (family ``sglang_extend``), compiled by
  the same tool with the block sizes it picks for that GPU, over fp16 K/V of the same shapes
  (its prefix loop: pages from the KV pool; its extend loop: the new tokens), and the tensor-
  core bound: the 4 * D * G FLOPs of QK^T and PV per row and page at the dense bf16 rate.

Issue model (H200, sm_90): 132 SMs x 4 warp-instructions per cycle x 1.98 GHz = 1.045e12
warp-instructions/s at perfect issue; HBM 4.8 TB/s; dense bf16 tensor cores 989 TFLOP/s. A
path is memory-bound when its warp-instructions take no longer to issue than its page takes to
arrive. For sm_80 (A100): 108 SMs x 4 x 1.41 GHz = 6.09e11 warp-instructions/s, HBM 2.039 TB/s,
312 TFLOP/s.

    python -m benchmarks.bench_kernel_static          # results/kernel_static_sm{90,80}.json
    python -m benchmarks.bench_kernel_static --quick  # one configuration per kernel, sm_90

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the kernels at import).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ISSUE_MODEL = {
    90: {
        "gpu": "H200", "sms": 132, "issue_per_cycle": 4, "clock_hz": 1.98e9, "hbm_bps": 4.8e12,
        "tensor_flops": 989.4e12,
    },
    80: {
        "gpu": "A100", "sms": 108, "issue_per_cycle": 4, "clock_hz": 1.41e9,
        "hbm_bps": 2.039e12, "tensor_flops": 312e12,
    },
}  # fmt: skip
PRESETS = ("k4v2_g128", "k4v4_g128", "k2v2_g128", "k4v2_g128_plus", "k2v2_g128_plus")
MARKERS = {"packed": {"packed_page_step"}, "fp16": {"fp16_page_step"}}
# Prefill loops by the source line of their ``for``: (kernel, path) -> key.
PREFILL_LOOPS = {
    ("_extend_kernel", "packed"): "for jj in range(sinks, j)",
    ("_extend_kernel", "fp16"): "for i in range(sinks * NB",
    ("_fwd_kernel", "fp16_prefix"): "for start_n in range(0, prefix_end",
    ("_fwd_kernel", "fp16_extend"): "for start_n in range(extend_start",
}
RESULTS = Path(__file__).resolve().parent / "results"


def issue_rate(capability: int) -> float:
    m = ISSUE_MODEL[capability]
    return m["sms"] * m["issue_per_cycle"] * m["clock_hz"]


def _decode_inputs(cfg, group: int, dtype):
    import torch

    from benchmarks.harness.random_store import random_store

    cache, table, lens, _ = random_store(cfg, 2, 3 * cfg.page_size + 5, 2, "cpu", False)
    cache.slot_k, cache.slot_v = cache.slot_k.to(dtype), cache.slot_v.to(dtype)
    q = torch.randn(2, 2 * group, cfg.head_dim, dtype=dtype)
    return q, cache, table, lens


def run_decode(cfg, group: int, dtype) -> None:
    from kvarn_sglang.kernels.decode import decode_attention

    q, cache, table, lens = _decode_inputs(cfg, group, dtype)
    decode_attention(q, cache, table, lens, cfg, cfg.head_dim**-0.5)


def run_extend(cfg, group: int, dtype) -> None:
    import torch

    from kvarn_sglang.kernels.extend import extend_attention

    q, cache, table, _ = _decode_inputs(cfg, group, dtype)
    pre = torch.tensor([2 * cfg.page_size + 3, cfg.page_size])
    ext = torch.tensor([2, 5])
    t = int(ext.sum())
    q = torch.randn(t, q.shape[1], cfg.head_dim, dtype=dtype)
    kn = torch.randn(t, 2, cfg.head_dim, dtype=dtype)
    extend_attention(q, kn, kn.clone(), cache, table, pre, ext, cfg, cfg.head_dim**-0.5)


def run_commit(cfg, group: int, dtype) -> None:
    import torch

    from kvarn_sglang.kernels.commit import commit_pages

    k = torch.randn(2, cfg.page_size, 2, cfg.head_dim).to(dtype)
    commit_pages(k, k.clone(), cfg)


def _sglang_extend_module(capability: int):
    """SGLang's extend kernel module, told it runs on sm_<capability> (it reads the device's
    capability at import to pick its block sizes)."""
    import sglang.kernels.ops.attention.extend_attention as ea

    ea._is_cuda, ea._is_hip, ea.CUDA_CAPABILITY = True, False, divmod(capability, 10)
    return ea


def sglang_extend_shape(capability: int, d: int) -> tuple[int, int, int]:
    """``(rows, keys per step, warps)`` of SGLang's extend program on that GPU."""
    _, _, _, block_m, block_n, warps = _sglang_extend_module(
        capability
    )._get_block_sizes_for_extend_attention(d, d)
    return block_m, block_n, warps


def run_sglang_extend(cfg, group: int, dtype) -> None:
    """SGLang's ``extend_attention_fwd`` as its Triton backend calls it (page size G, fp16
    K/V pool, causal, no custom mask) on the same shapes as ``run_extend``."""
    import torch
    import triton

    capability = int(triton.runtime.driver.active.get_current_target().arch)
    ea = _sglang_extend_module(capability)
    g, d = cfg.page_size, cfg.head_dim
    pre, ext = [2 * g + 3, g], [2, 5]
    q = torch.randn(sum(ext), 2 * group, d, dtype=dtype)
    k = torch.randn(sum(ext), 2, d, dtype=dtype)
    pool = torch.randn(4 * g, 2, d, dtype=dtype)
    qo = torch.tensor([0, ext[0], sum(ext)], dtype=torch.int32)
    kv = torch.tensor([0, pre[0], sum(pre)], dtype=torch.int32)
    ea.extend_attention_fwd(
        q, k, k.clone(), torch.empty_like(q), pool, pool.clone(), qo, kv,
        torch.arange(sum(pre)), None, True, None, max(ext), 1.0, 1.0, sm_scale=d**-0.5,
        page_size=g,
    )  # fmt: skip


RUNNERS = {
    "decode": run_decode,
    "extend": run_extend,
    "commit": run_commit,
    "sglang_extend": run_sglang_extend,
}


_ANALYSED: dict = {}


def analyse(launch, capability: int, cfg, kind: str, group: int = 1) -> dict:
    """The row of one compiled kernel (cached by kernel hash: the _plus presets compile the
    same attention kernels as their plain twins)."""
    key = (launch.kernel.hash, capability, kind, cfg.page_size, cfg.head_dim, cfg.sinkhorn_iters)
    key += (group,)
    if key not in _ANALYSED:
        _ANALYSED[key] = _analyse(launch, capability, cfg, kind, group)
    return dict(_ANALYSED[key])


def prefill_paths(blocks, capability: int, cfg, kernel: str, group: int) -> dict:
    """Per (query row x page of G keys) cost of each prefill loop of an extend kernel."""
    from benchmarks.harness import sass

    g, d = cfg.page_size, cfg.head_dim
    if kernel == "_extend_kernel":
        from kvarn_sglang.kernels.extend import block_shape, key_blocks

        rows, _, warps = block_shape(d, group, g)
        steps = {"packed": 1, "fp16": g // key_blocks(d, g)[1]}  # loop steps per page
    else:
        rows, keys, warps = sglang_extend_shape(capability, d)
        steps = {"fp16_prefix": g // keys, "fp16_extend": g // keys}
    m = ISSUE_MODEL[capability]
    tensor_ns = 4 * d * g / m["tensor_flops"] * 1e9
    out = {}
    for path, n in steps.items():
        body = sass.loop_body(blocks, PREFILL_LOOPS[(kernel, path)])
        if not body:
            raise RuntimeError(f"{kernel}: the {path} loop is not found in the SASS line info")
        per_warp = sum(len(blocks[i].instrs) for i in body)
        wi = per_warp * warps * n / rows
        out[f"{path}_row_page"] = {
            "warp_instructions": round(wi, 1),
            "warp_instructions_per_token": round(wi * group, 1),
            "rows_per_program": rows,
            "issue_ns": wi / issue_rate(capability) * 1e9,
            "tensor_core_ns": tensor_ns,
        }
    return out


def _analyse(launch, capability: int, cfg, kind: str, group: int = 1) -> dict:
    from benchmarks.harness import sass

    res = sass.resources(launch.kernel, capability)
    blocks = sass.disassemble(launch.kernel.asm["cubin"])
    row = {
        "kernel": launch.name,
        "error": launch.error,
        **res,
        **sass.occupancy(res, capability),
        "sass": sass.mix(sass.instructions(blocks)),
    }
    warps = res["num_warps"]
    rate = issue_rate(capability)
    hbm = ISSUE_MODEL[capability]["hbm_bps"]
    if kind == "decode" and launch.name == "_decode_split_kernel":
        from kvarn_sglang.kernels.decode import FP16_BLOCK

        per_warp = sass.path_instructions(blocks, MARKERS)
        page_bytes = {"packed": cfg.page_bytes, "fp16": 2 * 2 * cfg.page_size * cfg.head_dim}
        # One packed page per iteration; an fp16 page takes G / FP16_BLOCK iterations.
        per_page = {"packed": 1, "fp16": cfg.page_size // FP16_BLOCK}
        for path, nbytes in page_bytes.items():
            if path in per_warp:
                wi = per_warp[path] * warps * per_page[path]
                row[f"{path}_page"] = {
                    "warp_instructions": wi,
                    "issue_ns": wi / rate * 1e9,
                    "bytes": nbytes,
                    "hbm_ns": nbytes / hbm * 1e9,
                    "memory_bound": wi / rate <= nbytes / hbm,
                }
    if kind in ("extend", "sglang_extend") and launch.name in ("_extend_kernel", "_fwd_kernel"):
        row.update(prefill_paths(blocks, capability, cfg, launch.name, group))
    if kind == "commit":  # one tile: the persistent loop's body, inner loops run out
        body = sass.loop_body(blocks, "for tile in range")
        if not body:  # a count of 0 would pass for a measurement
            raise RuntimeError(
                "the commit kernel's tile loop is not found in its SASS line info: a cached "
                "build whose source file no longer exists? Run with an empty TRITON_CACHE_DIR"
            )
        trips = {"range(ITERS)": cfg.sinkhorn_iters, "range(REFIT)": cfg.refit_iters}
        wi = sass.dynamic_instructions(blocks[body[0] : body[-1] + 1], trips)
        row["tile_warp_instructions"] = int(wi * warps)
    return row


def sweep(args, capability: int) -> list[dict]:
    import torch

    from benchmarks.harness.static_compile import compile_for
    from kvarn_sglang.format.config import get_preset

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    for kind in args.kernels.split(","):
        groups = [int(g) for g in args.gqa.split(",")] if kind != "commit" else [1]
        presets = args.presets.split(",")
        for preset in presets[:1] if kind == "sglang_extend" else presets:  # no preset there
            for d in (int(x) for x in args.head_dims.split(",")):
                for group in groups:
                    for dname in args.dtypes.split(","):
                        cfg = get_preset(preset, head_dim=d)
                        name = "fp16 pool" if kind == "sglang_extend" else preset
                        config = {"preset": name, "head_dim": d, "gqa": group, "dtype": dname}
                        with compile_for(capability) as cap:
                            RUNNERS[kind](cfg, group, dtypes[dname])
                        seen = set()
                        commit_wi = 0
                        for launch in cap.launches:
                            key = (launch.name, launch.kernel.hash)
                            if key in seen:
                                continue
                            seen.add(key)
                            row = {"family": kind, **config, "grid": launch.grid}
                            row.update(analyse(launch, capability, cfg, kind, group))
                            commit_wi += row.get("tile_warp_instructions", 0)
                            rows.append(row)
                        if kind == "commit":  # K tile and V tile of one page of one KV head
                            for row in rows[-len(seen) :]:
                                row["page_warp_instructions"] = commit_wi
                        print_row(rows[-len(seen) :])
    compare_prefill(rows)
    return rows


def compare_prefill(rows: list[dict]) -> None:
    """Put SGLang's fp16 figure beside each KVarN extend row of the same shape (``vs_sglang``:
    KVarN's warp-instructions per row and page over SGLang's per row and fp16 page) and print
    the prefill table."""
    sglang = {
        (r["head_dim"], r["gqa"], r["dtype"]): r["fp16_prefix_row_page"]["warp_instructions"]
        for r in rows
        if "fp16_prefix_row_page" in r
    }
    table = []
    for r in rows:
        base = sglang.get((r["head_dim"], r["gqa"], r["dtype"]))
        if "packed_row_page" in r and base:
            r["vs_sglang"] = {
                p: round(r[f"{p}_row_page"]["warp_instructions"] / base, 3)
                for p in ("packed", "fp16")
            }
            table.append(r)
    if not table:
        return
    print(
        "\n| preset | D | GQA | dtype | regs | spill B | packed wi/row-page | fp16 wi/row-page "
        "| SGLang fp16 wi/row-page | packed vs SGLang | issue ns | tensor-core ns |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        pk, fp = r["packed_row_page"], r["fp16_row_page"]
        base = sglang[(r["head_dim"], r["gqa"], r["dtype"])]
        print(
            f"| {r['preset']} | {r['head_dim']} | {r['gqa']} | {r['dtype']} | {r['registers']} "
            f"| {r['spill_store_bytes']} | {pk['warp_instructions']} | {fp['warp_instructions']} "
            f"| {base} | {r['vs_sglang']['packed']:.2f}x | {pk['issue_ns']:.3f} "
            f"| {pk['tensor_core_ns']:.3f} |"
        )


def print_row(rows: list[dict]) -> None:
    if not hasattr(print_row, "header"):
        print(
            "| kernel | preset | D | GQA | dtype | regs | spill st/ld B | shared B | progs/SM "
            "| I2F | local | packed wi/page (HBM ns) | fp16 wi/page (HBM ns) | commit wi/page |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        print_row.header = True
    for r in rows:

        def path(name, r=r):
            p = r.get(f"{name}_page")
            return f"{p['warp_instructions']} ({p['hbm_ns']:.1f})" if p else "-"

        name = r["kernel"] + (" (does not load: shared memory)" if r["error"] else "")
        print(
            f"| {name} | {r['preset']} | {r['head_dim']} | {r['gqa']} | {r['dtype']} "
            f"| {r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} "
            f"| {r['shared_bytes']} | {r['programs_per_sm']} | {r['sass']['int_to_float']} "
            f"| {r['sass']['local']} | {path('packed')} | {path('fp16')} "
            f"| {r.get('page_warp_instructions', '-')} |",
            flush=True,
        )


# Llama-3-8B decode (32 layers, 8 KV heads, head_dim 128, 16.06 GB of bf16 weights) at a
# context of DECODE_CONTEXT tokens per request, k4v2_g128 pages.
LLAMA3_8B = {"layers": 32, "kv_heads": 8, "head_dim": 128, "weight_bytes": 16.06e9}
DECODE_CONTEXT = 4096


def commit_decode_model(rows: list[dict], capability: int) -> dict | None:
    """What decode's commit costs a Llama-3-8B decode step, modelled from the commit kernel's
    warp-instructions per page-head (K tile plus V tile, ``page_warp_instructions``). One tile
    (a page of one KV head, K or V) runs as one program on one SM at 4 warp-instructions per
    cycle at best; a layer launches K then V, each with pages x KV heads tiles in
    ceil(tiles / SMs) waves. A step's time is reading the weights and the batch's packed KV
    once at HBM bandwidth, spread evenly over the layers. A batch of B requests completes
    B / G pages per step on average; the model takes a step that completes
    max(1, round(B / G)) pages.

    * in the pass, before attention (extend; decode before the commit moved): every layer
      waits for its commit: layers x latency on the critical path;
    * decode, after attention on a side stream: layer L's commit starts when layer L's
      attention has run and the side stream is free; what the step waits for is the time the
      side stream runs past the last layer (``side_stream_critical_pct``, simulated layer by
      layer: the last layer's commit when a commit is shorter than a layer). While they run,
      the commits hold ``side_stream_sm_share_pct`` of the GPU's SM-time; a decode step is
      memory-bound, so that share is an upper bound on what they take from it, and
      ``side_stream_bound_pct`` is the sum of the two.
    """
    tiles = [
        r
        for r in rows
        if r["family"] == "commit" and r["preset"] == "k4v2_g128" and r["head_dim"] == 128
    ]
    if not tiles:
        return None
    dtype = "bf16" if any(r["dtype"] == "bf16" for r in tiles) else tiles[0]["dtype"]
    page_wi = next(r["page_warp_instructions"] for r in tiles if r["dtype"] == dtype)
    m, model = ISSUE_MODEL[capability], LLAMA3_8B
    g, page_bytes = 128, 13824  # k4v2_g128, D 128: tokens and bytes of one page-head
    page_s = page_wi / m["issue_per_cycle"] / m["clock_hz"]  # K launch + V launch, one wave
    out = {
        "model": model | {"context": DECODE_CONTEXT, "preset": "k4v2_g128", "dtype": dtype},
        "page_head_warp_instructions": page_wi,
        "commit_us_per_layer_one_wave": page_s * 1e6,
    }
    for batch in (32, 128, 256):
        kv = batch * DECODE_CONTEXT / g * page_bytes * model["kv_heads"] * model["layers"]
        step = (model["weight_bytes"] + kv) / m["hbm_bps"]
        pages = max(1, round(batch / g))
        layer_commit = page_s * -(-pages * model["kv_heads"] // m["sms"])
        layer_time = step / model["layers"]
        side_end = 0.0
        for layer in range(model["layers"]):
            side_end = max(side_end, (layer + 1) * layer_time) + layer_commit
        exposed = side_end - step
        sm_time = page_s * pages * model["kv_heads"] * model["layers"]
        sm_share = 100 * sm_time / (m["sms"] * step)
        out[f"batch_{batch}"] = {
            "step_us": step * 1e6,
            "pages_per_step": batch / g,
            "pages_modelled": pages,
            "commit_us_per_layer": layer_commit * 1e6,
            "in_pass_critical_pct": 100 * layer_commit * model["layers"] / step,
            "side_stream_critical_pct": 100 * exposed / step,
            "side_stream_sm_share_pct": sm_share,
            "side_stream_bound_pct": 100 * exposed / step + sm_share,
        }
    print(
        f"\nDecode commit, Llama-3-8B at {DECODE_CONTEXT} tokens, k4v2_g128 {dtype}: "
        f"{page_wi} warp-instructions per page-head"
    )
    print(
        "| batch | step us | pages | commit us/layer | in-pass % of step | side-stream % "
        "| SM share % | side-stream bound % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for batch in (32, 128, 256):
        r = out[f"batch_{batch}"]
        print(
            f"| {batch} | {r['step_us']:.0f} | {r['pages_modelled']} "
            f"| {r['commit_us_per_layer']:.1f} | {r['in_pass_critical_pct']:.1f} "
            f"| {r['side_stream_critical_pct']:.2f} | {r['side_stream_sm_share_pct']:.2f} "
            f"| {r['side_stream_bound_pct']:.2f} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities")
    parser.add_argument("--kernels", default="decode,extend,commit,sglang_extend")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--head-dims", default="64,128,256")
    parser.add_argument("--gqa", default="1,4,5,7,8")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--quick", action="store_true", help="k4v2_g128, D 128, GQA 4, fp16")
    parser.add_argument("--output-dir", default=str(RESULTS))
    parser.add_argument(
        "--json", default=None, help="write the rows here (one arch) instead of --output-dir"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernel_static compiles for the GPU: unset TRITON_INTERPRET", file=sys.stderr)
        return 1
    if args.quick:
        args.arch, args.presets, args.head_dims, args.gqa, args.dtypes = (
            "90", "k4v2_g128", "128", "4", "fp16",
        )  # fmt: skip
    from benchmarks.harness.common import result_header, write_result

    for capability in (int(a) for a in args.arch.split(",")):
        print(f"\n### sm_{capability}\n")
        rows = sweep(args, capability)
        body = {
            "target": f"sm_{capability}",
            "issue_model": ISSUE_MODEL[capability]
            | {"warp_instructions_per_s": issue_rate(capability)},
            "rows": rows,
        }
        model = commit_decode_model(rows, capability)
        if model:
            body["commit_decode_model"] = model
        out = args.json or (
            None if args.quick else Path(args.output_dir) / f"kernel_static_sm{capability}.json"
        )
        write_result(str(out) if out else None, result_header(argv, "cpu"), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
