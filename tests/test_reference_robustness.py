"""Finite in, finite out; non-finite input is rejected before anything is produced."""

from __future__ import annotations

import pytest
import torch
from conftest import kv_like

from kvarn_sglang.format.config import get_preset
from kvarn_sglang.quant.reference import dequantize_pages, quantize_pages

CFG = get_preset("k4v2_g64", head_dim=64)


def _round_trip(k, v, cfg=CFG):
    records = quantize_pages(k, v, cfg)
    kd, vd = dequantize_pages(records, cfg)
    assert torch.isfinite(kd).all() and torch.isfinite(vd).all()
    return kd, vd


def _rel(x, ref):
    return float((x - ref.float()).norm() / ref.float().norm())


def test_all_zero_pages_round_trip_to_zero():
    k = torch.zeros(2, 64, 2, 64, dtype=torch.float16)
    kd, vd = _round_trip(k, k.clone())
    assert kd.abs().max() < 1e-6 and vd.abs().max() < 1e-6


def test_constant_rows_round_trip():
    k = torch.full((1, 64, 2, 64), 3.25)
    v = torch.arange(64.0).view(1, 64, 1, 1).expand(1, 64, 2, 64).clone()  # each token constant
    kd, vd = _round_trip(k, v)
    assert _rel(kd, k) < 1e-3
    assert _rel(vd, v) < 0.5


@pytest.mark.parametrize("magnitude", [6.0e4, 1.0e-6])
def test_extreme_magnitudes_keep_their_relative_error(magnitude):
    """Near the fp16 maximum and at 1e-6 the error is that of ordinary data: the fp16
    metadata never overflows or flushes to zero. (At 1e-6 the std clamp makes the variance
    normalization inert, so the comparison is with plain RTN on the same axes.)"""
    k, v = kv_like(2, 64, 2, 64, seed=3)
    ref_cfg = CFG if magnitude > 1 else get_preset("k4v2_g64", head_dim=64, sinkhorn_iters=0)
    kd_ref, vd_ref = _round_trip(k, v, ref_cfg)
    scale = magnitude / max(k.abs().max().item(), v.abs().max().item())
    dtype = torch.float16 if magnitude > 1 else torch.float32
    ks, vs = (k * scale).to(dtype), (v * scale).to(dtype)
    kd, vd = _round_trip(ks, vs)
    assert _rel(kd, ks) == pytest.approx(_rel(kd_ref, k), rel=0.02)
    assert _rel(vd, vs) == pytest.approx(_rel(vd_ref, v), rel=0.02)


def test_bfloat16_input_matches_its_float32_copy():
    k, v = kv_like(2, 64, 1, 64, dtype=torch.bfloat16)
    a = quantize_pages(k, v, CFG)
    b = quantize_pages(k.float(), v.float(), CFG)
    assert torch.equal(a, b)
    _round_trip(k, v)


def test_single_huge_outlier_token_stays_finite_and_spares_other_tokens():
    k, v = kv_like(1, 64, 1, 64, seed=5)
    k[0, 17] *= 1000.0
    v[0, 17] *= 1000.0
    kd, vd = _round_trip(k, v)
    others = torch.ones(64, dtype=torch.bool)
    others[17] = False
    # V is per token: other tokens keep the error they would have without the outlier.
    assert _rel(vd[0, others], v[0, others]) < 0.6
    assert _rel(kd[0, 17], k[0, 17]) < 0.15


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_quantize_rejects_non_finite_values_naming_page_and_head(which, bad):
    k, v = kv_like(3, 64, 2, 64)
    target = k if which == "k" else v
    target[2, 5, 1, 7] = bad
    before_k, before_v = k.clone(), v.clone()
    with pytest.raises(ValueError, match=f"Non-finite values in {which}: page 2, kv head 1"):
        quantize_pages(k, v, CFG)
    assert torch.equal(k.nan_to_num(), before_k.nan_to_num())  # inputs untouched
    assert torch.equal(v.nan_to_num(), before_v.nan_to_num())


def test_quantize_rejects_tiles_beyond_the_fp16_metadata_range():
    k, v = kv_like(1, 64, 1, 64)
    with pytest.raises(ValueError, match="exceeds the fp16 metadata range"):
        quantize_pages(k * 1e30, v, CFG)


def test_quantize_rejects_integer_dtype():
    k = torch.zeros(1, 64, 1, 64, dtype=torch.int32)
    with pytest.raises(
        TypeError, match="Unsupported dtype of k: expected float16, bfloat16 or float32"
    ):
        quantize_pages(k, k, CFG)


@pytest.mark.parametrize(
    "shape", [(1, 32, 1, 64), (1, 64, 1, 128), (64, 1, 64), (1, 64, 1, 64, 1)], ids=str
)
def test_quantize_rejects_wrong_shapes(shape):
    k = torch.zeros(shape)
    with pytest.raises(
        ValueError, match=r"Invalid shape of k: expected \[num_pages, 64, num_kv_heads, 64\]"
    ):
        quantize_pages(k, k, CFG)


def test_quantize_rejects_k_v_shape_mismatch():
    k, v = kv_like(2, 64, 1, 64)
    with pytest.raises(ValueError, match="Invalid shape of v"):
        quantize_pages(k, v[:1], CFG)


def test_dequantize_rejects_wrong_records():
    with pytest.raises(ValueError, match="Invalid shape of records"):
        dequantize_pages(torch.zeros(2, CFG.page_bytes, dtype=torch.uint8), CFG)
    with pytest.raises(ValueError, match="Invalid shape of records"):
        dequantize_pages(torch.zeros(1, 1, CFG.page_bytes - 16, dtype=torch.uint8), CFG)


if __name__ == "__main__":
    test_extreme_magnitudes_keep_their_relative_error(6.0e4)
