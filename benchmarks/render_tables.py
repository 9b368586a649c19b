"""Render the published tables of README.md and docs/*.md from benchmarks/results/*.json.

A markdown file marks each generated table with a block::

    <!-- table:NAME ARG... -->
    (generated: never edit by hand)
    <!-- /table -->

``NAME`` picks a renderer in ``RENDERERS`` and ``ARG`` is usually the results JSON it reads
(a path from the repository root), so a table always shows what the committed JSON holds, in
the format the benchmark itself prints. ``tests/test_rendered_tables.py`` fails when a block's
text and its JSON differ; after a benchmark rerun, rewrite every block with::

    .venv/bin/python -m benchmarks.render_tables            # README.md and docs/*.md
    .venv/bin/python -m benchmarks.render_tables --check    # exit 1 if anything is stale

Renderers: ``presets HEAD_DIM`` (bytes of every preset, from the code),
``quant_error JSON``, ``accuracy JSON``, ``accuracy_curve JSON``, ``variants JSON TEXT``,
``prefix_sharing JSON [WORKLOAD]``, ``quality JSON`` (the figures ``pytest -m quality``
asserts) and ``norm_iters JSON``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table:(?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _json(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def presets(head_dim: str = "128") -> str:
    from kvarn_sglang.format.config import DEFAULT_PRESET, PRESETS, get_preset

    lines = [
        "| preset | K bits | V bits | G | bytes/page/head | bytes/token/head | vs fp16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in PRESETS:
        cfg = get_preset(name, head_dim=int(head_dim))
        tag = " (default)" if name == DEFAULT_PRESET else ""
        lines.append(
            f"| `{name}`{tag} | {cfg.k_bits} | {cfg.v_bits} | {cfg.page_size} | "
            f"{cfg.page_bytes:,} | {cfg.bytes_per_token:g} | {cfg.compression:.2f}x |"
        )
    return "\n".join(lines)


LABELS = {
    "fp8": "fp8 (e4m3, scale 1)",
    "kvarn-norot-k2v2": "kvarn-norot-k2v2 (ablation)",
    "kvarn-nonorm-k2v2": "kvarn-nonorm-k2v2 (ablation)",
}


def _labelled(table: str) -> str:
    """The method column of a benchmark table as the docs show it: KVarN presets in bold,
    ablations and fp8's scale named."""
    from kvarn_sglang.format.config import PRESETS

    out = []
    for line in table.split("\n"):
        cells = line.split(" | ")
        name = cells[0].removeprefix("| ")
        if name in PRESETS:
            cells[0] = f"| **{name}**"
        elif name in LABELS:
            cells[0] = f"| {LABELS[name]}"
        out.append(" | ".join(cells))
    return "\n".join(out)


def quant_error(path: str) -> str:
    from kvarn_sglang.eval.quant_error import ErrorRow, format_table

    data = _json(path)
    return _labelled(format_table([ErrorRow(**row) for row in data["rows"]]))


def accuracy(path: str) -> str:
    from kvarn_sglang.eval.report import format_table, result_from_json

    return _labelled(format_table(result_from_json(_json(path))))


def accuracy_curve(path: str) -> str:
    from kvarn_sglang.eval.report import format_curve_table, result_from_json

    return format_curve_table(result_from_json(_json(path)))


def variants(path: str, text: str) -> str:
    from benchmarks.bench_variants import format_rows

    data = _json(path)
    return format_rows(data["texts"][text]["rows"], data["commit_cost"])


def prefix_sharing(path: str, workload: str | None = None) -> str:
    from benchmarks.harness.prefix_sharing_report import table

    rows = _json(path)["rows"]
    return table([r for r in rows if workload is None or r["workload"] == workload])


def quality(path: str) -> str:
    data = _json(path)
    lines = [
        "| method | KL (nats) | top-1 % | perplexity |",
        "|---|---|---|---|",
        f"| unquantized | 0 | 100 | {data['reference_ppl']:.4f} |",
    ]
    for name, row in data["figures"].items():
        lines.append(f"| {name} | {row['kl']:.6f} | {100 * row['top1']:.2f} | {row['ppl']:.4f} |")
    return "\n".join(lines)


def norm_iters(path: str) -> str:
    return norm_iters_table(_json(path))


def norm_iters_table(data: dict) -> str:
    """``benchmarks/bench_norm_iters.py``'s table: error (%) per iteration count."""
    iters = data["iters"]
    head = "| input | error | " + " | ".join(f"{i} it." for i in iters) + " | by error |"
    lines = [head, "|" + "---|" * (len(iters) + 3)]
    for row in data["rows"]:
        cells = " | ".join(f"{100 * x:.2f}" for x in row["values"])
        best = row.get("by_error")
        best = "-" if best is None else f"{100 * best:.2f}"
        lines.append(f"| {row['input']} | {row['metric']} | {cells} | {best} |")
    return "\n".join(lines)


RENDERERS: dict[str, Callable[..., str]] = {
    "presets": presets,
    "quant_error": quant_error,
    "accuracy": accuracy,
    "accuracy_curve": accuracy_curve,
    "variants": variants,
    "prefix_sharing": prefix_sharing,
    "quality": quality,
    "norm_iters": norm_iters,
}


def render_block(spec: str) -> str:
    """The table of one block's spec (``NAME ARG...``)."""
    name, *args = spec.split()
    if name not in RENDERERS:
        raise ValueError(f"Unknown table {name!r}: expected one of {sorted(RENDERERS)}")
    return RENDERERS[name](*args)


def render(text: str) -> str:
    """``text`` with every table block rewritten."""

    def one(m: re.Match) -> str:
        return f"{m.group(1)}{render_block(m.group('spec'))}\n{m.group(4)}"

    return BLOCK.sub(one, text)


def stale_blocks(text: str) -> list[str]:
    """Specs of the blocks of ``text`` whose body differs from what they render to."""
    return [
        m.group("spec")
        for m in BLOCK.finditer(text)
        if m.group("body") != render_block(m.group("spec")) + "\n"
    ]


def default_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pages", nargs="*", help="markdown files (default: README, docs/*.md)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
    args = parser.parse_args(argv)
    pages = [Path(p) for p in args.pages] or default_pages()
    stale = 0
    for page in pages:
        text = page.read_text()
        if args.check:
            for spec in stale_blocks(text):
                print(f"{page}: table {spec!r} differs from its JSON")
                stale += 1
        else:
            new = render(text)
            if new != text:
                page.write_text(new)
                print(f"rendered {page}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
