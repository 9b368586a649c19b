"""Plots of committed results that their benchmark does not draw itself, from the JSON alone.

* ``capacity.png``: KV tokens the same memory holds. Left, the pools of
  ``prefix_sharing.json`` (``bench_prefix_sharing``: Llama-3-8B's KV shape, a 40 GB budget, the
  fp16 slots of 256 running requests counted); right, what SGLang's scheduler reported for
  the CPU servers of ``server_cpu_smollm2.json`` (``bench_server --cpu``, SmolLM2-135M).
* ``kernel_static_sm90.png``: the decode split kernel's cost per packed page under the issue
  model of ``kernel_static_sm90.json`` (``bench_kernel_static``): issue time of its
  warp-instructions next to the time HBM takes to deliver the page, per head_dim and preset
  (GQA 4, fp16). Below the HBM time, the kernel is memory-bound by construction.

    python -m benchmarks.plot_results            # both, into benchmarks/results/
    python -m benchmarks.plot_results --results DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
POOLS = ("fp16-p1", "fp8-p1", "k4v4_g128", "k4v2_g128", "k2v2_g128")
KERNEL_PRESETS = ("k4v4_g128", "k4v2_g128", "k2v2_g128", "k4v2_g128_plus")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_capacity(results: Path, out: Path) -> Path:
    plt = _pyplot()
    sharing = json.loads((results / "prefix_sharing.json").read_text())
    server = json.loads((results / "server_cpu_smollm2.json").read_text())
    rows = {r["pool"]: r for r in sharing["rows"] if r["workload"] == "agentic"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), width_ratios=(5, 2))
    base = rows["fp16-p1"]["token_capacity"]
    tokens = [rows[p]["token_capacity"] / 1e6 for p in POOLS]
    colors = ["#999999", "#bbbbbb", "#4c72b0", "#2a4d8f", "#1b2f5c"]
    bars = left.bar(POOLS, tokens, color=colors)
    for bar, pool in zip(bars, POOLS, strict=True):
        ratio = rows[pool]["token_capacity"] / base
        left.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=9)  # fmt: skip
    shape = sharing["model_shape"]
    left.set_title(
        f"KV tokens in {sharing['budget_bytes'] / 1e9:.0f} GB ({shape['layers']} layers, "
        f"{shape['kv_heads']} KV heads, head_dim {shape['head_dim']}; "
        f"{sharing['max_running_requests']} running)",
        fontsize=9,
    )
    left.set_ylabel("million tokens")
    cap = server["capacity"]
    per_gib = [cap["fp16"]["tokens_per_gib"] / 1e3, cap["kvarn"]["tokens_per_gib"] / 1e3]
    bars = right.bar(
        ["fp16", cap["kvarn"]["kvarn"]["preset"]], per_gib, color=[colors[0], colors[3]]
    )
    right.annotate(f"{cap['ratio']:.2f}x", (bars[1].get_x() + bars[1].get_width() / 2, per_gib[1]),
                   ha="center", va="bottom", fontsize=9)  # fmt: skip
    right.set_title("SGLang's own count, CPU server\n(SmolLM2-135M, head_dim 64)", fontsize=9)
    right.set_ylabel("thousand tokens per GiB of KV")
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path = out / "capacity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_kernel_static(results: Path, out: Path, target: str = "sm90") -> Path:
    plt = _pyplot()
    data = json.loads((results / f"kernel_static_{target}.json").read_text())
    rows = [
        r for r in data["rows"]
        if r["kernel"] == "_decode_split_kernel" and r["gqa"] == 4 and r["dtype"] == "fp16"
        and r["preset"] in KERNEL_PRESETS and r.get("packed_page")
    ]  # fmt: skip
    dims = sorted({r["head_dim"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(10, 3.6), sharey=False)
    for ax, dim in zip(axes, dims, strict=True):
        by_preset = {r["preset"]: r["packed_page"] for r in rows if r["head_dim"] == dim}
        presets = [p for p in KERNEL_PRESETS if p in by_preset]
        x = range(len(presets))
        issue = [by_preset[p]["issue_ns"] for p in presets]
        hbm = [by_preset[p]["hbm_ns"] for p in presets]
        ax.bar([i - 0.2 for i in x], issue, 0.4, label="issue (warp-instructions)", color="#4c72b0")
        ax.bar([i + 0.2 for i in x], hbm, 0.4, label="HBM delivers the page", color="#bbbbbb")
        ax.set_xticks(list(x), [p.replace("_g128", "") for p in presets], fontsize=8)
        ax.set_title(f"head_dim {dim}", fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("ns per packed page per KV head")
    model = data["issue_model"]
    fig.suptitle(
        f"Decode split kernel, {data['target']} ({model['gpu']} issue model), GQA 4, fp16: "
        "compiled and read statically, not run",
        fontsize=9,
    )
    axes[-1].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    path = out / f"kernel_static_{target}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON files are")
    p.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: --results)")
    args = p.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    for path in (plot_capacity(args.results, out), plot_kernel_static(args.results, out)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
