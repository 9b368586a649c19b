"""The ``kvarn-sglang eval`` subcommand: arguments, model and text loading, outputs.

Writes into ``--output`` DIR: ``results.json`` (every number, curves included, with the
command, model, device and versions), ``table.md`` (also printed) and ``accuracy.png`` (the
error-accumulation curves).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from kvarn_sglang.eval.provenance import versions
from kvarn_sglang.quant.baselines import DEFAULT_METHODS

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.txt"
CURVE_NOTE = (
    "Error accumulation: mean absolute error of every layer's attention output (before o_proj) "
    "vs the reference, over the positions that read quantized pages."
)


def add_eval_parser(sub) -> None:
    """Register ``eval`` on the CLI's subparsers."""
    ev = sub.add_parser(
        "eval", help="accuracy of KVarN vs fp16 and baselines on a real model (decode regime)"
    )
    ev.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a local path")
    ev.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated")
    ev.add_argument("--text", default=None, help="text file (default: embedded passage)")
    ev.add_argument("--tokens", type=int, default=4096, help="tokens of the text to use (max)")
    ev.add_argument(
        "--prompts", default=None, help="generation prompts, one per line (chat template if any)"
    )
    ev.add_argument("--gen-tokens", type=int, default=384, help="greedy tokens per prompt")
    ev.add_argument("--gen-mode", default="forced", choices=("forced", "incremental"))
    ev.add_argument("--page-size", type=int, default=128, help="pages of non-preset methods")
    ev.add_argument("--sink-pages", type=int, default=1)
    ev.add_argument("--device", default="cpu", help="cpu or cuda")
    ev.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)"
    )
    ev.add_argument("--output", default="eval-results", help="directory for the outputs")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=run_eval_command, extra_meta=None)


def read_prompts(path: str | None) -> list[str]:
    """Non-empty lines of ``path`` (default: the prompts shipped in the package)."""
    file = Path(path) if path else PROMPTS_FILE
    if not file.is_file():
        raise ValueError(f"Prompts file {str(file)!r} does not exist")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _encode(tokenizer, text: str, device: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids.to(device)


def encode_prompt(tokenizer, prompt: str, device: str) -> torch.Tensor:
    """``int [1, P]``: the prompt as a user turn of the tokenizer's chat template (instruct
    models), or the raw text when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return _encode(tokenizer, prompt, device)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)


def _describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    cpu = platform.processor() or platform.machine()
    return f"{device} ({cpu}, {torch.get_num_threads()} threads)"


def run_eval_command(args: argparse.Namespace) -> int:
    from kvarn_sglang.eval.models import load_model, read_text
    from kvarn_sglang.eval.report import (
        format_curve_table,
        format_table,
        plot_curves,
        result_to_json,
        write_json,
    )
    from kvarn_sglang.eval.run import EvalSettings, build_methods, run_eval

    started = time.time()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    build_methods(methods, 64, args.page_size)  # unknown names fail before the model loads
    if args.text is not None and not Path(args.text).is_file():
        raise ValueError(f"Text file {args.text!r} does not exist")
    if args.tokens <= 0:
        raise ValueError(f"Unsupported --tokens {args.tokens}: expected > 0")
    if args.threads < 0:
        raise ValueError(f"Unsupported --threads {args.threads}: expected >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = read_prompts(args.prompts)
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device)
    ids = _encode(tokenizer, read_text(args.text), args.device)[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        print(f"note: the text has only {ids.shape[1]} tokens", file=sys.stderr)
    settings = EvalSettings(
        methods=methods,
        sink_pages=args.sink_pages,
        page_size=args.page_size,
        gen_tokens=args.gen_tokens,
        gen_mode=args.gen_mode,
    )
    prompt_ids = [encode_prompt(tokenizer, p, args.device) for p in prompts]
    result = run_eval(model, ids, prompt_ids, settings, progress=not args.no_progress)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    text = args.text or "the embedded text"
    check = result.reference_check
    summary = (
        f"{args.model} ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} q heads, "
        f"{cfg.num_key_value_heads} KV heads, head_dim {head_dim}) on {result.tokens} tokens of "
        f"{text}; reference (unquantized cache) ppl {result.reference_ppl:.3f} over positions "
        f">= {result.scored_from}; {args.sink_pages} fp16 sink page(s); greedy: "
        f"{len(prompts)} prompts x {args.gen_tokens} tokens ({args.gen_mode}). Attention: "
        f"{check['attention']}; the reference is the model's own forward (max |d logit| "
        f"{check['max_abs_logit_diff']:.2g} against transformers' {check['implementation']} "
        f"on the first {check['tokens']} tokens)."
    )
    table = f"{format_table(result)}\n\n{CURVE_NOTE}\n\n{format_curve_table(result)}"
    print(f"\n{summary}\n\n{table}")
    out = Path(args.output)
    meta = {
        "command": " ".join(["kvarn-sglang", *sys.argv[1:]]),
        "model": args.model,
        "model_config": {
            "layers": cfg.num_hidden_layers,
            "q_heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": head_dim,
        },
        "text": args.text or "embedded",
        "device": _describe_device(args.device),
        "versions": versions("torch", "transformers"),
        "prompts": prompts,
        "reference_texts": [tokenizer.decode(g) for g in result.reference_generations],
    }
    meta.update(args.extra_meta or {})
    meta["seconds"] = round(time.time() - started, 1)
    write_json(out / "results.json", result_to_json(result, meta))
    (out / "table.md").write_text(f"{summary}\n\n{table}\n")
    name = Path(args.text).name if args.text else text
    plot_curves(result, out / "accuracy.png", f"{args.model}, {result.tokens} tokens of {name}")
    print(f"\nwrote {out}/results.json, table.md, accuracy.png", file=sys.stderr)
    return 0
