"""What ``kvarn-sglang eval`` writes: the markdown table, ``results.json`` and the PNG plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from kvarn_sglang.config import PRESETS
from kvarn_sglang.eval_run import EvalResult

KVARN_STYLE = {"linestyle": "-", "linewidth": 2.0}
BASELINE_STYLE = {"linestyle": "--", "linewidth": 1.2}


def _divergence(counts: list[int], n: int) -> str:
    if not counts:
        return "-"
    return f"{' / '.join(str(c) for c in counts)} of {n}"


def format_table(result: EvalResult) -> str:
    """Markdown table: one row per method (KL in nats per token, top-1 in %)."""
    lines = [
        "| method | K/V bits | bits/elem | B/token/head | vs fp16 | ppl | Δppl | KL | top-1 % "
        "| tokens to 1st divergence |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r.method} | {r.k_bits}/{r.v_bits} | {r.bits_per_element:.2f} "
            f"| {r.bytes_per_token_per_head:.1f} | {r.compression:.2f}x | {r.ppl:.3f} "
            f"| {r.delta_ppl:+.3f} | {r.kl:.4f} | {100 * r.top1:.2f} "
            f"| {_divergence(r.divergence, result.gen_tokens)} |"
        )
    return "\n".join(lines)


def result_to_json(result: EvalResult, meta: dict) -> dict:
    """``meta`` (command, model, versions, ...) followed by every field of ``result``."""
    return {**meta, **asdict(result)}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def plot_curves(result: EvalResult, path: Path, title: str) -> None:
    """Two panels (accumulated, static): attention-output MAE per position bucket, log y.

    Buckets before ``scored_from`` read no quantized page (error 0) and are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = result.scored_from // result.bucket
    x = result.positions[first:]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(result.rows):
        kvarn = r.method in PRESETS or r.method.startswith("kvarn-")
        style = KVARN_STYLE if kvarn else BASELINE_STYLE
        for ax, curve in zip(axes, (r.accumulated, r.static), strict=True):
            ax.plot(x, curve[first:], label=r.method, color=cmap(i % 20), **style)
    for ax, name in zip(
        axes, ("accumulated (quantized forward)", "static (no propagation)"), strict=True
    ):
        ax.set_title(name)
        ax.set_xlabel(f"context position (bucket of {result.bucket} tokens)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("attention output MAE vs reference (before o_proj, layer mean)")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
