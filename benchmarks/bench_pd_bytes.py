"""How many bytes does PD disaggregation move from the prefill server to the decode server per
request, with KVarN pages against fp16?

For each KV cache (fp16, and the KVarN presets given), a prefill server, a decode server and
``sglang_router`` (``benchmarks.harness.pd_fleet``; mooncake's TCP transport on this machine)
serve the same prompts one at a time (random token ids, seeded; prefill only: one new token).
The bytes of each handover are SGLang's own transfer counter (``sglang:kv_transfer_total_mb``
of the prefill server, ``--enable-metrics``: the indices the engine was given times the item
sizes of the regions it moved), checked against the pools' descriptors
(``pd_fleet.handover_bytes``: fp16 moves every page whole, KVarN its sink page and partial last
page as fp16 slots and every other page packed). Reported per prompt: bytes per request and per
token, and the ratio to fp16; and per KV cache the bytes per token of the pages past the sink
(the slope between the two longest prompts, both whole pages) and its ratio to fp16, which the
descriptors predict as ``2 * head_dim * 2 / (page_bytes / G)`` (4.49x for k4v2 at head_dim 64,
4.74x at head_dim 128: the analytic column; SmolLM2 has head_dim 64).

    python -m benchmarks.bench_pd_bytes --output benchmarks/results/pd_bytes.json --plot
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.harness.common import result_header, write_result
from benchmarks.harness.pd_fleet import handover_bytes, pd_fleet, prometheus_sum
from benchmarks.harness.server_process import SMOLLM2_HF
from kvarn_sglang.format.config import get_preset

SMOLLM2 = {"layers": 30, "kv_heads": 3, "head_dim": 64, "page_size": 128}
COMMON = ["--page-size", "128", "--max-total-tokens", "16384", "--max-running-requests", "2",
          "--skip-server-warmup", "--random-seed", "0"]  # fmt: skip
METRIC = "sglang:kv_transfer_total_mb_sum"


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--caches", default="fp16,k4v2_g128,k4v4_g128,k2v2_g128")
    p.add_argument("--tokens", default="5,100,128,200,256,300,1000,2048,4096")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    p.add_argument("--plot", action="store_true", help="write a PNG next to --output")
    return p.parse_args(argv)


def _args(cache: str) -> list[str]:
    if cache == "fp16":
        return ["--attention-backend", "torch_native", *COMMON]
    return ["--kv-cache", "kvarn", "--kvarn-preset", cache, *COMMON]


def measure(cache: str, lengths: list[int], seed: int, logs: Path) -> list[dict]:
    """Bytes of each prompt's handover through a PD fleet with ``cache``."""
    page_bytes = None if cache == "fp16" else get_preset(cache, head_dim=64).page_bytes
    rows = []
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in lengths]
    prefill_args = [*_args(cache), "--enable-metrics"]
    with pd_fleet(SMOLLM2_HF, prefill_args, _args(cache), logs / cache) as (prefill, _, router):
        for n, ids in zip(lengths, prompts, strict=True):
            before = prometheus_sum(prefill.url, METRIC)
            router.generate({"input_ids": ids, "sampling_params": {"max_new_tokens": 1}})
            moved = round((prometheus_sum(prefill.url, METRIC) - before) * 2**20)
            expected = handover_bytes(n, page_bytes=page_bytes, **SMOLLM2)
            rows.append({"tokens": n, "bytes": moved, "descriptor_bytes": expected})
            print(
                f"{cache} {n} tokens: {moved:,} bytes (descriptors {expected:,})", file=sys.stderr
            )
    return rows


def summarize(results: dict[str, list[dict]]) -> dict:
    """Per cache: the slope past the sink (bytes per token) and ratios to fp16."""
    fp16 = {r["tokens"]: r["bytes"] for r in results.get("fp16", [])}
    out = {}
    for cache, rows in results.items():
        a, b = sorted(rows, key=lambda r: r["tokens"])[-2:]
        slope = (b["bytes"] - a["bytes"]) / (b["tokens"] - a["tokens"])
        entry = {"bytes_per_token_past_sink": slope}
        if cache != "fp16":
            cfg = get_preset(cache, head_dim=64)
            entry["analytic_ratio_head_dim_64"] = 2 * 64 * 2 / (cfg.page_bytes / cfg.page_size)
            d128 = get_preset(cache, head_dim=128)
            entry["analytic_ratio_head_dim_128"] = 2 * 128 * 2 / (d128.page_bytes / d128.page_size)
        out[cache] = entry
        for r in rows:
            r["bytes_per_token"] = r["bytes"] / r["tokens"]
            if r["tokens"] in fp16:
                r["fp16_over_this"] = fp16[r["tokens"]] / r["bytes"]
    if "fp16" in out:
        base = out["fp16"]["bytes_per_token_past_sink"]
        for entry in out.values():
            entry["fp16_over_this_past_sink"] = base / entry["bytes_per_token_past_sink"]
    return out


def table(results: dict[str, list[dict]], summary: dict) -> str:
    caches = list(results)
    lines = [
        "| prompt tokens | " + " | ".join(f"{c} bytes (per token)" for c in caches) + " |",
        "|---|" + "---|" * len(caches),
    ]
    for i, row in enumerate(results[caches[0]]):
        cells = []
        for c in caches:
            r = results[c][i]
            ratio = f", {r['fp16_over_this']:.2f}x" if c != "fp16" and "fp16_over_this" in r else ""
            cells.append(f"{r['bytes']:,} ({r['bytes_per_token']:,.0f}{ratio})")
        lines.append(f"| {row['tokens']} | " + " | ".join(cells) + " |")
    lines += ["", "| KV cache | bytes/token past the sink | fp16 / this | analytic D64 / D128 |",
              "|---|---|---|---|"]  # fmt: skip
    for c, s in summary.items():
        analytic = (
            f"{s['analytic_ratio_head_dim_64']:.2f}x / {s['analytic_ratio_head_dim_128']:.2f}x"
            if "analytic_ratio_head_dim_64" in s
            else "1.00x"
        )
        ratio = f"{s.get('fp16_over_this_past_sink', float('nan')):.2f}x"
        lines.append(f"| {c} | {s['bytes_per_token_past_sink']:,.0f} | {ratio} | {analytic} |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for cache, rows in results.items():
        ax.plot(
            [r["tokens"] for r in rows], [r["bytes_per_token"] for r in rows], "o-", label=cache
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("bytes moved per prompt token")
    ax.set_title("PD handover, SmolLM2-135M (30 layers, 3 KV heads, head_dim 64)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None) -> int:
    args = _parse(argv)
    lengths = [int(x) for x in args.tokens.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="bench_pd_bytes_"))
    results = {c: measure(c, lengths, args.seed, logs) for c in args.caches.split(",")}
    summary = summarize(results)
    print(table(results, summary))
    mismatched = [(c, r) for c, rows in results.items() for r in rows
                  if r["bytes"] != r["descriptor_bytes"]]  # fmt: skip
    body = {"model": "SmolLM2-135M", **{"shape": SMOLLM2}, "transfer": "mooncake TCP (loopback)",
            "results": results, "summary": summary, "counter_mismatches": mismatched}  # fmt: skip
    write_result(args.output, result_header(argv, "cpu"), body)
    if args.plot and args.output:
        plot(results, Path(args.output).with_suffix(".png"))
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
