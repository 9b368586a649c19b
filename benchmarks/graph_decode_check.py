"""Does one decode step of a KVarN layer capture in a CUDA graph and replay exactly?

The step is what the attention backend runs per layer in a graph-captured decode (no SGLang
here: ``PageStore`` and the kernels directly): write the new token's K/V into its page's fp16
slot, commit the pages this token completed (a static, padded commit list: page 0 entries are
skipped, no NaN check, no host synchronisation), then decode attention over the page table.
It is run eagerly, captured, replayed, and replayed again after the inputs change in place;
every replay must equal the eager step on the same inputs, and the eager step must equal the
reference. Replay and eager times are reported.

    python -m benchmarks.graph_decode_check --output benchmarks/results/graph_h200.json
    python -m benchmarks.graph_decode_check --smoke   # CPU, Triton interpreter, no capture
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.harness.common import result_header, time_fn, write_result
from kvarn_sglang.format.config import KVarNConfig, get_preset
from kvarn_sglang.format.numerics import PagedKVCache
from kvarn_sglang.kernels.decode import decode_attention
from kvarn_sglang.quant.reference import quantize_pages, ref_decode_attention
from kvarn_sglang.serving.page_store import PageStore


def build(cfg: KVarNConfig, lens: list[int], hq: int, hkv: int, device: str, seed: int = 0):
    """A store holding ``len(lens)`` requests (K/V written, full pages past the sink
    committed) whose next token is at position ``lens[i]``; returns the store, the static
    step inputs and the dense K/V for the reference."""
    g, d = cfg.page_size, cfg.head_dim
    gen = torch.Generator().manual_seed(seed)
    max_pages = max(n // g + 1 for n in lens)
    store = PageStore(
        cfg, num_pages=len(lens) * max_pages + 1, num_slots=2 * len(lens) + 1, layer_num=1,
        head_num=hkv, dtype=torch.float16, device=device,
    )  # fmt: skip
    table = torch.zeros(len(lens), max_pages, dtype=torch.int64)
    dense = []
    for b, n in enumerate(lens):
        pages = torch.arange(b * max_pages, (b + 1) * max_pages) + 1
        table[b] = pages
        k = (torch.randn(n + 1, hkv, d, generator=gen) * 2).half()
        v = torch.randn(n + 1, hkv, d, generator=gen).half()
        dense.append((k, v))
        own = n // g
        slots = [*pages[: min(cfg.sink_pages, own)].tolist(), int(pages[own])]
        store.assign_slots(torch.tensor(sorted(set(slots)), device=device))
        loc = (pages.repeat_interleave(g)[:n] * g + torch.arange(n) % g).to(device)
        store.write(0, loc, k[:n].to(device), v[:n].to(device))
        full = list(range(cfg.sink_pages, n // g))
        if full:
            kp = k[: (n // g) * g].view(-1, g, hkv, d)[full]
            vp = v[: (n // g) * g].view(-1, g, hkv, d)[full]
            store.packed[0][pages[full].to(device)] = quantize_pages(kp, vp, cfg).to(device)
    step_in = {
        "q": torch.randn(len(lens), hq, d, generator=gen).half().to(device),
        "k": torch.stack([k[n] for (k, _), n in zip(dense, lens, strict=True)]).to(device),
        "v": torch.stack([v[n] for (_, v), n in zip(dense, lens, strict=True)]).to(device),
        "loc": torch.tensor([int(table[b, n // g]) * g + n % g for b, n in enumerate(lens)]),
        "table": table.to(device),
        "lens": torch.tensor([n + 1 for n in lens], device=device),
        # Pages this token completes (0 pads the static list, as in graph decode).
        "commit": torch.tensor(
            [
                int(table[b, n // g]) if (n + 1) % g == 0 and n // g >= cfg.sink_pages else 0
                for b, n in enumerate(lens)
            ],
            device=device,
        ),
    }
    step_in["loc"] = step_in["loc"].to(device)
    return store, step_in, dense


def step(store: PageStore, x: dict, cfg: KVarNConfig, splits: int) -> torch.Tensor:
    """One layer's decode step: write, commit (static list), attend."""
    store.write(0, x["loc"], x["k"], x["v"])
    store.commit_slots(0, x["commit"], check_finite=False)
    d = cfg.head_dim
    return decode_attention(
        x["q"], store.view(0), x["table"], x["lens"], cfg, d**-0.5, max_splits=splits
    )


def reference(store: PageStore, x: dict, cfg: KVarNConfig) -> torch.Tensor:
    cache = store.view(0)
    cpu = PagedKVCache(*(t.cpu() for t in (cache.packed, cache.slot_k, cache.slot_v)), None)
    cpu.page_slot = cache.page_slot.cpu()
    q, table, lens = x["q"].cpu(), x["table"].cpu(), x["lens"].cpu()
    return ref_decode_attention(q, cpu, table, lens, cfg, cfg.head_dim**-0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="k4v2_g128")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="CPU, interpreter, no capture")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.smoke:
        print("graph_decode_check needs a GPU (use --smoke for a CPU check)", file=sys.stderr)
        return 1
    g = 64 if args.smoke else 128
    cfg = get_preset(args.preset, head_dim=args.head_dim if not args.smoke else 64)
    if args.smoke:
        cfg = KVarNConfig(k_bits=cfg.k_bits, v_bits=cfg.v_bits, page_size=g, head_dim=64)
        args.kv_heads, args.q_heads = 1, 4
    # Token positions: some requests complete a page with this token, one is in its first page.
    lens = [g - 1, 2 * g - 1, 3 * g + 5, 5] if args.smoke else [g - 1, 5 * g - 1, 40 * g + 7, 7]
    store, x, _ = build(cfg, lens, args.q_heads, args.kv_heads, args.device)
    splits = 4
    eager = step(store, x, cfg, splits).float()
    ref = reference(store, x, cfg)
    err_ref = (eager.cpu() - ref).abs().max().item()
    result = {"eager_vs_reference_max_abs": err_ref}
    ok = err_ref < 2e-2
    if args.device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step(store, x, cfg, splits)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(store, x, cfg, splits)
        graph.replay()
        torch.cuda.synchronize()
        result["replay_vs_eager_max_abs"] = (out.float() - eager).abs().max().item()
        x["q"].copy_(torch.randn_like(x["q"]))  # new inputs, same buffers
        graph.replay()
        again = step(store, x, cfg, splits).float()
        result["replay_new_inputs_vs_eager_max_abs"] = (out.float() - again).abs().max().item()
        ok &= result["replay_vs_eager_max_abs"] == 0.0
        ok &= result["replay_new_inputs_vs_eager_max_abs"] == 0.0
        result["replay_us"] = time_fn(graph.replay, args)
        result["eager_us"] = time_fn(lambda: step(store, x, cfg, splits), args)
    else:  # the interpreter cannot capture: the step twice must agree
        result["repeat_vs_eager_max_abs"] = (
            (step(store, x, cfg, splits).float() - eager).abs().max().item()
        )
        ok &= result["repeat_vs_eager_max_abs"] == 0.0
    result["ok"] = bool(ok)
    print(
        " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    )
    body = {"config": cfg.name, "head_dim": cfg.head_dim, "lens": lens, **result}
    write_result(args.output, result_header(argv, args.device), body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
