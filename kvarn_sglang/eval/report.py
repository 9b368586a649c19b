"""What ``kvarn-sglang eval`` writes: the markdown table, ``results.json`` and the PNG plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from kvarn_sglang.eval.run import EvalResult, MethodResult
from kvarn_sglang.format.config import PRESETS

FAMILY_COLORS = (  # (name prefix, colour); KVarN presets are matched by name first
    ("kvarn-norot", "tab:cyan"),
    ("kvarn-nonorm", "tab:green"),
    ("kivi", "tab:red"),
    ("hadamard", "tab:purple"),
    ("int", "tab:brown"),
    ("fp8", "tab:pink"),
    ("fp16", "tab:gray"),
)
LINESTYLES = {4: "-", 6: "-.", 8: "--"}  # by K bits + V bits; 16 and more dotted


def _style(method: str, k_bits: int, v_bits: int) -> dict:
    color = "tab:blue" if method in PRESETS else "tab:olive"
    for prefix, c in FAMILY_COLORS:
        if method.startswith(prefix) and method not in PRESETS:
            color = c
            break
    width = 2.2 if method in PRESETS else 1.3
    return {"color": color, "linestyle": LINESTYLES.get(k_bits + v_bits, ":"), "linewidth": width}


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


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def curve_summary(result: EvalResult, row: MethodResult) -> dict[str, float]:
    """Scalars of one method's curves over the buckets that read quantized pages.

    ``static``/``accumulated``: mean MAE; ``amplification``: accumulated / static;
    ``growth``: accumulated MAE of the last quarter of those buckets / the first quarter.
    """
    first = result.scored_from // result.bucket
    acc, static = row.accumulated[first:], row.static[first:]
    quarter = max(1, len(acc) // 4)
    early, late = _mean(acc[:quarter]), _mean(acc[-quarter:])
    return {
        "static": _mean(static),
        "accumulated": _mean(acc),
        "amplification": _mean(acc) / max(_mean(static), 1e-30),
        "growth": late / max(early, 1e-30),
    }


def format_curve_table(result: EvalResult) -> str:
    """Markdown table of ``curve_summary`` for every method."""
    lines = [
        "| method | static MAE | accumulated MAE | accumulated / static | growth (last / first "
        "quarter) |",
        "|---|---|---|---|---|",
    ]
    for r in result.rows:
        c = curve_summary(result, r)
        lines.append(
            f"| {r.method} | {c['static']:.2e} | {c['accumulated']:.2e} "
            f"| {c['amplification']:.2f}x | {c['growth']:.2f}x |"
        )
    return "\n".join(lines)


def result_from_json(data: dict) -> EvalResult:
    """Rebuild an ``EvalResult`` from ``results.json`` (extra metadata keys are ignored)."""
    names = set(EvalResult.__dataclass_fields__)
    fields = {k: v for k, v in data.items() if k in names}
    fields["rows"] = [MethodResult(**r) for r in data["rows"]]
    return EvalResult(**fields)


def result_to_json(result: EvalResult, meta: dict) -> dict:
    """``meta`` (command, model, versions, ...) followed by every field of ``result``."""
    return {**meta, **asdict(result)}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def plot_curves(result: EvalResult, path: Path, title: str) -> None:
    """Two panels (accumulated, static): attention-output MAE per position bucket, log y.
    Colour: method family (KVarN presets blue, thick); line style: K + V bits.

    Buckets before ``scored_from`` read no quantized page (error 0) and are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = result.scored_from // result.bucket
    x = result.positions[first:]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for r in result.rows:
        style = _style(r.method, r.k_bits, r.v_bits)
        for ax, curve in zip(axes, (r.accumulated, r.static), strict=True):
            ax.plot(x, curve[first:], label=f"{r.method} ({r.k_bits}/{r.v_bits})", **style)
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
