"""Quantization error of every method on real K/V: the table ``kvarn-sglang quant-error`` prints.

For each layer of a model, the post-RoPE Q, K, V of one text are captured. Each method
quantizes the sequence's full pages (G tokens per page); we report, averaged over layers:

* ``k_err`` / ``v_err``: relative Frobenius error ``|X^ - X| / |X|`` over the full pages past
  the sink pages (the pages a pool would store quantized);
* ``attn_err``: relative error of the attention output against fp16 attention, with the
  decode-consistent semantics a server computes (earlier pages quantized, sink pages and the
  query's own page fp16), over the queries that read at least one quantized page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from kvarn_sglang.eval.kv_capture import LayerQKV
from kvarn_sglang.quant.baselines import PageMethod, get_method
from kvarn_sglang.quant.page_attention import paged_attention
from kvarn_sglang.quant.reference import decode_consistent_attention


@dataclass
class ErrorRow:
    """One method's errors, averaged over layers."""

    method: str
    k_bits: int
    v_bits: int
    bits_per_element: float
    bytes_per_token_per_head: float
    compression: float
    k_err: float
    v_err: float
    attn_err: float


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def dequantized_read(
    method: PageMethod, k: torch.Tensor, v: torch.Tensor, sink_pages: int
) -> tuple[torch.Tensor, torch.Tensor, slice]:
    """K, V ``[T, Hkv, D]`` as later pages read them: full pages past the sinks quantized
    and dequantized by ``method``, everything else unchanged. Also returns the stored span."""
    g, t = method.page_size, k.shape[0]
    first, full = sink_pages, t // g
    k_read, v_read = k.float().clone(), v.float().clone()
    span = slice(first * g, max(full, first) * g)
    if full > first:
        kp = k[span].reshape(full - first, g, *k.shape[1:])
        vp = v[span].reshape(full - first, g, *v.shape[1:])
        kd, vd = method.dequantize_pages(method.quantize_pages(kp, vp))
        k_read[span], v_read[span] = kd.flatten(0, 1), vd.flatten(0, 1)
    return k_read, v_read, span


def exact_attention(layer: LayerQKV) -> torch.Tensor:
    """Causal fp32 attention of one layer with its window/soft-cap/sinks, ``[T, Hq, D]``."""
    q, k, v = (x.transpose(0, 1) for x in (layer.q, layer.k, layer.v))
    return paged_attention(q, 0, k, v, k, v, 0, 128, layer.scale, attn=layer.attn).transpose(0, 1)


def measure_method(
    method: PageMethod, layers: Sequence[LayerQKV], exact: Sequence[torch.Tensor], sink_pages: int
) -> ErrorRow:
    """Errors of ``method`` on captured ``layers`` (``exact``: their fp32 attention outputs)."""
    g = method.page_size
    k_errs, v_errs, attn_errs = [], [], []
    for layer, ref in zip(layers, exact, strict=True):
        k_read, v_read, span = dequantized_read(method, layer.k, layer.v, sink_pages)
        k_errs.append(_rel(k_read[span], layer.k[span]))
        v_errs.append(_rel(v_read[span], layer.v[span]))
        pos = torch.arange(layer.q.shape[0])
        out = decode_consistent_attention(
            layer.q, pos, k_read, v_read, layer.k, layer.v, 0, g, layer.scale, layer.attn
        )
        reads = slice((sink_pages + 1) * g, None)
        attn_errs.append(_rel(out[reads], ref[reads]))
    return ErrorRow(
        method=method.name,
        k_bits=method.k_bits,
        v_bits=method.v_bits,
        bits_per_element=round(method.layout.bits_per_element, 4),
        bytes_per_token_per_head=method.layout.bytes_per_token,
        compression=round(method.layout.compression, 3),
        k_err=sum(k_errs) / len(k_errs),
        v_err=sum(v_errs) / len(v_errs),
        attn_err=sum(attn_errs) / len(attn_errs),
    )


def measure_methods(
    names: Sequence[str],
    layers: Sequence[LayerQKV],
    *,
    page_size: int = 128,
    sink_pages: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[ErrorRow]:
    """``measure_method`` for every method name (see ``kvarn_sglang.quant.baselines``)."""
    t = layers[0].q.shape[0]
    head_dim = layers[0].k.shape[2]
    if t < (sink_pages + 2) * page_size:
        raise ValueError(
            f"Too few tokens ({t}): the error table needs at least {(sink_pages + 2) * page_size} "
            f"(sink pages + 2 pages of {page_size})"
        )
    exact = [exact_attention(layer) for layer in layers]
    rows = []
    for name in names:
        if progress:
            progress(name)
        method = get_method(name, head_dim=head_dim, page_size=page_size)
        rows.append(measure_method(method, layers, exact, sink_pages))
    return rows


def format_table(rows: Sequence[ErrorRow]) -> str:
    """Markdown table of ``rows`` (errors as percentages)."""
    lines = [
        "| method | K bits | V bits | bits/elem | B/token/head | vs fp16 | K err % | V err % "
        "| attn err % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.k_bits} | {r.v_bits} | {r.bits_per_element:.2f} "
            f"| {r.bytes_per_token_per_head:.1f} | {r.compression:.2f}x | {100 * r.k_err:.2f} "
            f"| {100 * r.v_err:.2f} | {100 * r.attn_err:.2f} |"
        )
    return "\n".join(lines)


def rows_to_json(rows: Sequence[ErrorRow]) -> list[dict]:
    return [asdict(r) for r in rows]
