"""Page-level quality, asserted against measured figures: a quantizer that gets worse fails.

Three kinds of input, all fixed-seed numpy (``quality_data``), all through the torch reference
(the spec the kernels are tested against):

* tiles whose row scales span 100x (the case variance normalization is for) through the
  normalization and rounding of every preset (``quantize_oriented``);
* hard pages (heavy tails, outlier channels and tokens, 100x channel scales) through
  ``quantize_pages``/``dequantize_pages`` of every preset at head_dim 128: the K and V errors,
  and the decode-consistent attention error of queries two pages in;
* the sink: queries of page 1 read page 0 exactly (fp16), so their attention equals exact
  attention; a lost sink page makes it differ.

The CPU reference is deterministic, so the bounds are the measured values plus ``SLACK`` (1%).
A figure that improves by more than ``IMPROVED`` fails too: it is stale, rewrite it with the
printed measurement (``KVARN_QUALITY_MEASURE=1 ... -s``).
"""

from __future__ import annotations

import os

import pytest
import torch
from quality_data import hard_pages, spread_tiles

from kvarn_sglang.format.config import PRESETS, get_preset
from kvarn_sglang.quant.reference import (
    dequantize_oriented,
    dequantize_pages,
    quantize_oriented,
    quantize_pages,
    ref_decode_consistent_attention,
    rotate,
)
from kvarn_sglang.serving.pages import pass_pages

pytestmark = pytest.mark.quality

SLACK, IMPROVED = 0.01, 0.05

# Relative Frobenius error of 8 tiles [128, 128] whose row scales span 100x, by (bits, refits)
# with the default preset's normalization iterations: measured 0.493860, 0.426911, 0.098158,
# 0.092902 (a log-scale cap of 0.5 instead of 10 puts 2-bit at about 0.72 and 4-bit at 0.14).
SPREAD_FIGURES = {(2, 0): 0.493860, (2, 4): 0.426911, (4, 0): 0.098158, (4, 4): 0.092902}
# Per preset at head_dim 128 on hard_pages(3, G, 2, 128, seed=7): relative error of K, of V,
# and of the attention output of the third page's queries (sink fp16, second page quantized).
PAGE_FIGURES = {
    "k2v2_g128": (0.468960, 0.423420, 0.903853),
    "k2v2_g128_plus": (0.410994, 0.344270, 0.495074),
    "k2v2_g64": (0.382980, 0.440505, 0.829795),
    "k2v4_g128": (0.468960, 0.083584, 0.825073),
    "k4v2_g128": (0.093002, 0.423420, 0.350394),
    "k4v2_g128_plus": (0.074427, 0.344270, 0.270299),
    "k4v2_g64": (0.072094, 0.440505, 0.215730),
    "k4v4_g128": (0.093002, 0.083584, 0.221801),
    "k4v4_g64": (0.072094, 0.088860, 0.109994),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _check(what: str, got: float, figure: float) -> None:
    if os.environ.get("KVARN_QUALITY_MEASURE"):
        print(f"\n{what}: {got:.6f}")
        return
    assert got <= figure * (1 + SLACK), f"{what} got worse: {got:.6f} > figure {figure}"
    assert got >= figure * (1 - IMPROVED), f"{what} {got:.6f} beats figure {figure}: update it"


@pytest.mark.parametrize("bits, refits", sorted(SPREAD_FIGURES))
def test_error_on_tiles_with_rows_spread_100x(bits, refits):
    iters = get_preset().sinkhorn_iters
    m = torch.from_numpy(spread_tiles(8, 128, 128, 100.0, seed=3))
    t = quantize_oriented(m, bits, iters, refit_iters=refits)
    what = f"{bits}-bit ({refits} refits) error on tiles spread 100x"
    _check(what, _rel(dequantize_oriented(t), m), SPREAD_FIGURES[(bits, refits)])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_errors_on_hard_pages(name):
    cfg = get_preset(name, head_dim=128)
    g = cfg.page_size
    k, v = (torch.from_numpy(x) for x in hard_pages(3, g, 2, 128, seed=7))
    kd, vd = dequantize_pages(quantize_pages(k, v, cfg), cfg)
    figures = PAGE_FIGURES[name]
    _check(f"{name} K error", _rel(kd, k), figures[0])
    _check(f"{name} V error", _rel(vd, v), figures[1])
    # One sequence of the three pages; queries of the last page read the first (the sink)
    # fp16 and the second quantized: their error against exact attention.
    gen = torch.Generator().manual_seed(7)
    seq_k, seq_v = k.flatten(0, 1), v.flatten(0, 1)  # [3G, H, D]
    q = torch.randn(3 * g, 4, 128, generator=gen) * 2
    out = ref_decode_consistent_attention(q, seq_k, seq_v, cfg, 128**-0.5)
    exact = _exact_attention(q, seq_k, seq_v)
    last = slice(2 * g, 3 * g)
    _check(f"{name} attention error", _rel(out[last], exact[last]), figures[2])


def _exact_attention(q, k, v):
    """Causal fp32 attention ``[T, Hq, D]`` (GQA by repeating KV heads)."""
    group = q.shape[1] // k.shape[1]
    qh, kh, vh = (x.transpose(0, 1).float() for x in (q, k, v))
    kh, vh = kh.repeat_interleave(group, 0), vh.repeat_interleave(group, 0)
    out = torch.nn.functional.scaled_dot_product_attention(
        qh, kh, vh, is_causal=True, scale=q.shape[-1] ** -0.5
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_sink_page_is_read_exactly(name):
    """Queries of page 1 read page 0 (the sink) as it was written: their decode-consistent
    attention equals exact attention (measured: 1.9e-7 relative, fp32 rounding); a quantized
    first page would put them at the preset's attention error (>= 1e-2)."""
    cfg = get_preset(name, head_dim=64)
    g = cfg.page_size
    assert cfg.sink_pages == 1
    k, v = (torch.from_numpy(x) for x in hard_pages(2, g, 1, 64, seed=2))
    seq_k, seq_v = k.flatten(0, 1), v.flatten(0, 1)
    q = torch.randn(2 * g, 2, 64, generator=torch.Generator().manual_seed(2))
    out = ref_decode_consistent_attention(q, seq_k, seq_v, cfg, 64**-0.5)
    exact = _exact_attention(q, seq_k, seq_v)
    assert _rel(out[g:], exact[g:]) < 2e-6  # 10x the measured 1.9e-7
    # and the sink's rotation round trip (what a sink slot would hold) is exact too
    assert _rel(rotate(rotate(k)), k) < 1e-6


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_pass_never_commits_a_sink_page(name):
    """Over every prefill and decode shape up to four pages, with the preset's sink pages,
    page 0 is never committed and always takes an fp16 slot when it is new."""
    cfg = get_preset(name)
    g = cfg.page_size
    for prefix in range(0, 4 * g, 17):
        for seq in (prefix + 1, prefix + g - 1, prefix + g + 3, 4 * g):
            if seq <= prefix:
                continue
            p = pass_pages([prefix], [seq], g, cfg.sink_pages)
            committed = [j for _, j in p.from_slots + p.direct]
            assert 0 not in committed, (prefix, seq, committed)
            if prefix == 0:
                assert p.new_sink_rows == [0], (prefix, seq, p)


if __name__ == "__main__":
    test_errors_on_hard_pages("k4v2_g128")
