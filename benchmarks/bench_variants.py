"""Which commit-time variant of KVarN lowers its error at the same bits? An ablation on real text.

Runs the ``kvarn-sglang eval`` machinery (decode-consistent quantized attention, one teacher-
forced forward per method, errors propagating through layers and time) on SmolLM2-135M for
KVarN variants that keep the stored format (see ``kvarn_sglang.quant.variants``) against the KVarN
presets. Protocol: variants are chosen on WikiText-2 (``--variants``) and confirmed on the C4
sample (``--confirm``); a variant counts only if it wins on both at equal or fewer bits per
element with a commit cost within 2x of plain KVarN (``commit_x``: CPU reference time of
``quantize_pages`` relative to the plain preset with the same bits).

    .venv/bin/python -m benchmarks.bench_variants --threads 1 \\
        --output benchmarks/results/variants_smollm2.json

The committed result merges two runs (WikiText-2 screen, C4 confirmation) run in parallel:
``--merge WIKI.json C4.json --output ...``. ``--show JSON`` reprints its tables. Data
(``--data-dir``, default ``../shared/data``): ``wikitext2-test.raw`` and
``c4-validation-2k.parquet`` (needs pyarrow); a missing file is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.harness.common import result_header, write_result
from kvarn_sglang.quant.variants import LayerwiseMethod

ROOT = Path(__file__).resolve().parents[1]
TEXTS = {"wikitext2": "wikitext2-test.raw", "c4": "c4-validation-2k.parquet"}
VARIANTS = (
    "k2v2_g128,k2v2_g128+it0,k2v2_g128+it2,k2v2_g128+it4,k2v2_g128+it16,k2v2_g128+prenorm,"
    "k2v2_g128+clip8,k2v2_g128+clip16@0.4,k2v2_g128+refit2,k2v2_g128+clip8+refit2,"
    "k2v2_g128+prenorm+clip8+refit2,k2v2_g128+recent1,"
    "k4v2_g128,k2v4_g128,layers:k4v4_g128/k2v2_g128,k4v2_g128+clip8+refit2"
)
CONFIRM = "k2v2_g128,k2v2_g128+clip8+refit2,k4v2_g128,k4v2_g128+clip8+refit2"


def load_text(data_dir: Path, name: str, tokenizer, tokens: int) -> torch.Tensor | None:
    """``int [1, tokens]`` of text ``name``; C4 documents are joined with blank lines.
    None (with a message) when the file or pyarrow is missing."""
    path = data_dir / TEXTS[name]
    if not path.exists():
        print(f"skipped {name}: {path} not found (pass --data-dir)", file=sys.stderr)
        return None
    if name == "wikitext2":
        text = path.read_text(encoding="utf-8")
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            print(f"skipped {name}: reading {path} needs pyarrow (the eval extra)", file=sys.stderr)
            return None
        docs, text = pq.read_table(path, columns=["text"]).column("text").to_pylist(), ""
        for doc in docs:
            text += doc + "\n\n"
            if len(text) > 8 * tokens:  # ~4 chars per token: plenty
                break
    return tokenizer(text, return_tensors="pt").input_ids[:, :tokens]


def commit_cost(methods, head_dim: int, pages: int = 16, heads: int = 3, reps: int = 7) -> dict:
    """Fastest of ``reps`` CPU times (s, one thread) of ``quantize_pages`` on ``[pages, G,
    heads, D]`` normal data, per method, and its ratio to the plain preset with the same name
    prefix. Methods are timed round-robin after one warm-up each, and the fastest run is kept,
    so load from other work on a shared machine spreads evenly and is filtered out."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    timed = [m for m in methods if not isinstance(m, LayerwiseMethod)]
    data = {}
    for m in timed:
        shape = (pages, m.page_size, heads, head_dim)
        data[m.name] = (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
        m.quantize_pages(*data[m.name])  # warm-up
    seconds = dict.fromkeys(data, float("inf"))
    for _ in range(reps):
        for m in timed:
            t = time.perf_counter()
            m.quantize_pages(*data[m.name])
            seconds[m.name] = min(seconds[m.name], time.perf_counter() - t)
    torch.set_num_threads(threads)
    ratio = {
        n: s / seconds[n.split("+")[0]] for n, s in seconds.items() if n.split("+")[0] in seconds
    }
    return {"seconds": seconds, "ratio": ratio, "threads": 1, "pages": pages, "heads": heads}


def bits_at(name: str, head_dim: int) -> float | None:
    """Bits per element of the record of ``name`` at ``head_dim`` (None if not a preset)."""
    from kvarn_sglang.format.config import PRESETS, get_preset

    if name.startswith("layers:"):
        presets = name[len("layers:") :].split("/")
        return sum(get_preset(p, head_dim=head_dim).layout.bits_per_element for p in presets) / len(
            presets
        )
    preset = name.split("+")[0]
    if preset not in PRESETS:
        return None
    return get_preset(preset, head_dim=head_dim).layout.bits_per_element


def format_rows(rows: list[dict], cost: dict) -> str:
    lines = [
        "| variant | bits/elem (D=64) | bits/elem (D=128) | ppl | KL | top-1 | acc. MAE "
        "| commit x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d128 = bits_at(r["method"], 128)
        x = cost["ratio"].get(r["method"])
        mae = sum(r["accumulated"][2:]) / max(len(r["accumulated"]) - 2, 1)
        lines.append(
            f"| {r['method']} | {r['bits_per_element']:.3f} | "
            f"{'-' if d128 is None else f'{d128:.3f}'} | {r['ppl']:.3f} | {r['kl']:.4f} | "
            f"{r['top1']:.4f} | {mae:.4f} | {'-' if x is None else f'{x:.2f}'} |"
        )
    return "\n".join(lines)


def show(data: dict) -> str:
    out = []
    for text, res in data["texts"].items():
        out.append(
            f"### {text}: {res['tokens']} tokens, reference ppl {res['reference_ppl']:.3f}\n\n"
            + format_rows(res["rows"], data["commit_cost"])
        )
    return "\n\n".join(out)


def plot(data: dict, path: Path) -> None:
    """Per text: KL of every variant (bars, plain presets dark) and the accumulation curves of
    the methods measured on both texts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(data["texts"])
    both = set.intersection(*({r["method"] for r in data["texts"][t]["rows"]} for t in texts))
    fig, axes = plt.subplots(2, len(texts), figsize=(8 * len(texts), 10), squeeze=False)
    for col, text in enumerate(texts):
        res = data["texts"][text]
        rows = res["rows"]
        ax = axes[0][col]
        colors = ["tab:gray" if "+" not in r["method"] else "tab:blue" for r in rows]
        ax.barh([r["method"] for r in rows], [r["kl"] for r in rows], color=colors)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title(f"{text}: mean KL vs the unquantized cache (lower is better)")
        ax = axes[1][col]
        for r in rows:
            if r["method"] in both:
                style = "-" if "+" in r["method"] else "--"
                ax.plot(res["positions"][2:], r["accumulated"][2:], style, label=r["method"])
        ax.set_title(f"{text}: accumulated attention-output MAE")
        ax.set_xlabel("position")
        ax.set_ylabel("MAE (mean over layers)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths: list[str]) -> dict:
    """One result from several runs of this benchmark: the rows of every text (runs of the
    same text must share its tokens; the commands and commits of every part are kept under
    ``parts``) and commit costs of every method, measured again."""
    from kvarn_sglang.quant.variants import parse_variant

    out: dict = {"texts": {}, "parts": []}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for text, res in data["texts"].items():
            if text not in out["texts"]:
                out["texts"][text] = res
                continue
            have = out["texts"][text]
            if (have["tokens"], have["reference_ppl"]) != (res["tokens"], res["reference_ppl"]):
                raise ValueError(f"Cannot merge {path}: its {text} run used other tokens")
            names = {r["method"] for r in have["rows"]}
            have["rows"] += [r for r in res["rows"] if r["method"] not in names]
        out["parts"].append({k: data[k] for k in ("command", "git_commit", "device", "versions")})
        out["model"], out["head_dim"] = data["model"], data["head_dim"]
    names = dict.fromkeys(r["method"] for t in out["texts"].values() for r in t["rows"])
    # Commit costs measured again here, all in one sitting, so that they compare.
    methods = [parse_variant(n, out["head_dim"]) for n in names]
    out["commit_cost"] = commit_cost(methods, out["head_dim"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--variants", default=VARIANTS, help="screened on WikiText-2")
    parser.add_argument("--confirm", default=CONFIRM, help="confirmed on C4")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--output", default=None, help="results JSON; the PNG goes beside it")
    parser.add_argument("--show", default=None, help="print the tables of a results JSON")
    parser.add_argument("--merge", nargs="+", default=None, help="combine results JSONs")
    args = parser.parse_args(argv)
    if args.merge:
        body = merge(args.merge)
        print(show(body))
        if args.output:
            write_result(args.output, result_header(argv, "cpu"), body)
            plot(body, Path(args.output).with_suffix(".png"))
        return 0
    if args.show:
        print(show(json.loads(Path(args.show).read_text())))
        return 0
    from kvarn_sglang.eval.models import load_model
    from kvarn_sglang.eval.run import EvalSettings, run_eval
    from kvarn_sglang.quant.variants import parse_variant

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    header = result_header(argv, "cpu")
    body: dict = {"model": "smollm2-135m", "head_dim": head_dim, "texts": {}}
    every = []
    for text, names in (("wikitext2", args.variants), ("c4", args.confirm)):
        names = [n.strip() for n in names.split(",") if n.strip()]
        if not names:
            continue
        ids = load_text(Path(args.data_dir), text, tokenizer, args.tokens)
        if ids is None:
            continue
        methods = [parse_variant(n, head_dim) for n in names]
        every += [m for m in methods if m.name not in {e.name for e in every}]
        settings = EvalSettings(methods=methods, gen_tokens=0)
        res = run_eval(model, ids, [], settings)
        rows = [asdict(r) for r in res.rows]
        for r in rows:
            for key in ("static_per_layer", "divergence", "divergence_margin"):
                r.pop(key)
        body["texts"][text] = {
            "tokens": res.tokens,
            "scored_from": res.scored_from,
            "reference_ppl": res.reference_ppl,
            "positions": res.positions,
            "seconds": res.seconds,
            "rows": rows,
        }
        print(f"\n### {text}\n\n{format_rows(rows, {'ratio': {}})}", flush=True)
    body["commit_cost"] = commit_cost(every, head_dim)
    print(f"\n{show(body)}")
    if args.output:
        write_result(args.output, header, body)
        plot(body, Path(args.output).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
