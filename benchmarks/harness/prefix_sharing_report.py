"""The prefix-sharing benchmark's markdown table and plot (``bench_prefix_sharing``).

Ratios compare each pool with fp16 and fp8 at page size 1 (``fp16-p1``, ``fp8-p1``: what fp16
and fp8 users run) in the same workload, when those pools were run.
"""

from __future__ import annotations


def _ratio(row: dict, base: dict | None, key: str) -> str:
    if base is None or not base[key]:
        return "-"
    return f"{row[key] / base[key]:.2f}x"


def table(rows: list[dict]) -> str:
    head = (
        "| workload | pool | tokens | resident (mean) | decode batch mean / p50 / p99 | "
        "mean while requests wait | mean vs fp16-p1 / fp8-p1 | decode steps | cached % | "
        "re-prefilled | retracted | TTFT steps mean / p99 | slots: total / peak / cached "
        "sinks (mean) | sink evictions / waits for slots |"
    )
    out = [head, "|" + "---|" * 14]
    for r in rows:
        same = {x["pool"]: x for x in rows if x["workload"] == r["workload"]}
        fp16, fp8 = same.get("fp16-p1"), same.get("fp8-p1")
        kv = r["fp16_slots"] > 0
        slots = (
            f"{r['fp16_slots']} / {r['slot_peak']} / {r['cached_sink_slots_mean']:.1f}"
            if kv
            else "-"
        )
        waits = f"{r['sink_evictions']} / {r['admissions_waited_for_slots']}" if kv else "-"
        out.append(
            f"| {r['workload']} | {r['pool']} | {r['token_capacity']:,} | "
            f"{r['resident_tokens_mean']:,.0f} | {r['decode_batch_mean']:.1f} / "
            f"{r['decode_batch_p50']:.0f} / {r['decode_batch_p99']:.0f} | "
            f"{r['decode_batch_waiting_mean']:.1f} | "
            f"{_ratio(r, fp16, 'decode_batch_mean')} / {_ratio(r, fp8, 'decode_batch_mean')} | "
            f"{r['decode_steps']:,} | {100 * r['cached_token_rate']:.1f} | "
            f"{r['reprefilled_tokens']:,} | {r['retractions']} | "
            f"{r['ttft_steps_mean']:.1f} / {r['ttft_steps_p99']:.0f} | {slots} | {waits} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    """Decode batch over time for every pool, and fp16 slot use over time for KVarN pools
    (held, and held by cached sinks), of the first workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workload = rows[0]["workload"]
    rows = [r for r in rows if r["workload"] == workload]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=False)
    for r in rows:
        batch = r["series"]["decode_batch"]
        top.plot(_steps(r, batch), batch, label=r["pool"], lw=1)
    top.set(title=f"{workload}: decode batch (branches decoding at once)",
            xlabel="decode step", ylabel="requests")  # fmt: skip
    top.legend(fontsize=7, ncol=4)
    for r in rows:
        if r["fp16_slots"]:
            held = r["series"]["slots_held"]
            steps = _steps(r, held, key="tokens_used")
            line = bottom.plot(steps, held, lw=1, label=f"{r['pool']}: held")[0]
            bottom.plot(steps, r["series"]["cached_sink_slots"], lw=1, ls=":",
                        color=line.get_color(), label=f"{r['pool']}: cached sinks")  # fmt: skip
            bottom.axhline(r["fp16_slots"], color=line.get_color(), lw=0.6, ls="--")
    bottom.set(title="fp16 slots held (dashed: pool size)", xlabel="forward pass",
               ylabel="slots")  # fmt: skip
    bottom.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _steps(row: dict, thinned: list, key: str = "decode_batch") -> list[float]:
    """x positions of a thinned series (``_thin`` kept every k-th point)."""
    total = (
        row["decode_steps"]
        if key == "decode_batch"
        else row["decode_steps"] + row["prefill_passes"]
    )
    k = max(1, total // 400)
    return [i * k for i in range(len(thinned))]
