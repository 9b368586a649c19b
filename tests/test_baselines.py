from __future__ import annotations

import pytest
import torch
from conftest import kv_like

from kvarn_sglang.format.config import get_preset
from kvarn_sglang.quant.baselines import DEFAULT_METHODS, FP8_MAX, get_method
from kvarn_sglang.quant.reference import quantize_pages

# Bytes per token per head at head_dim 128, G 128 (K + V, metadata included).
EXPECTED_BYTES_PER_TOKEN = {
    "fp16": 512,
    "fp8": 256,
    "int8": 256 + 8,
    "int4": 128 + 8,
    "kivi4": 128 + 8,  # K: 2 fp16 per channel per page (4 B/token at G=D); V: 2 fp16 per token
    "kivi2": 64 + 8,
    "hadamard4": 128 + 8,
    "hadamard2": 64 + 8,
    "kvarn-norot-k2v2": 76,
    "kvarn-nonorm-k2v2": 64 + 8,
    "k4v2_g128": 108,
    "k4v4_g128": 140,
    "k2v2_g128": 76,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_BYTES_PER_TOKEN))
def test_bytes_per_token(name):
    assert get_method(name, head_dim=128).layout.bytes_per_token == EXPECTED_BYTES_PER_TOKEN[name]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_every_method_round_trips_real_records(name, d):
    method = get_method(name, head_dim=d, page_size=64 if name.endswith("g64") else 128)
    k, v = kv_like(2, method.page_size, 2, d)
    records = method.quantize_pages(k, v)
    assert records.dtype == torch.uint8 and records.shape == (2, 2, method.layout.page_bytes)
    kd, vd = method.dequantize_pages(records)
    assert kd.shape == k.shape and vd.shape == v.shape
    bits = min(method.k_bits, method.v_bits)
    bound = {16: 1e-3, 8: 0.05, 4: 0.25, 2: 0.6}[bits]  # int4 per token: 0.20 on K outliers
    assert (kd - k).norm() / k.norm() < bound and (vd - v).norm() / v.norm() < bound


def test_fp16_is_exact_for_fp16_input():
    m = get_method("fp16", head_dim=64)
    k, v = kv_like(1, 128, 2, 64, dtype=torch.float16)
    kd, vd = m.dequantize_pages(m.quantize_pages(k, v))
    assert torch.equal(kd, k.float()) and torch.equal(vd, v.float())


def test_fp8_matches_a_saturating_e4m3_cast():
    m = get_method("fp8", head_dim=64)
    k, v = kv_like(1, 128, 1, 64)
    k[0, 0, 0, 0] = 1000.0  # beyond e4m3's range: saturates instead of becoming NaN
    kd, _ = m.dequantize_pages(m.quantize_pages(k, v))
    expected = k.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    assert torch.equal(kd, expected)


def test_more_bits_means_less_error():
    k, v = kv_like(2, 128, 2, 64, seed=2)
    errs = {}
    for name in ("int4", "int8", "kivi2", "kivi4", "hadamard2", "hadamard4"):
        m = get_method(name, head_dim=64)
        kd, _ = m.dequantize_pages(m.quantize_pages(k, v))
        errs[name] = float((kd - k).norm() / k.norm())
    assert errs["int8"] < errs["int4"] and errs["kivi4"] < errs["kivi2"]
    assert errs["hadamard4"] < errs["hadamard2"]


def test_kivi_per_channel_beats_per_token_on_outlier_channels():
    k, v = kv_like(2, 128, 2, 64, seed=4)  # K has outlier channels

    def k_err(name):
        m = get_method(name, head_dim=64)
        return float((m.dequantize_pages(m.quantize_pages(k, v))[0] - k).norm() / k.norm())

    assert k_err("kivi4") < k_err("int4")


def test_kvarn_method_is_the_reference():
    m = get_method("k4v2_g128", head_dim=64)
    k, v = kv_like(2, 128, 2, 64)
    assert torch.equal(
        m.quantize_pages(k, v), quantize_pages(k, v, get_preset("k4v2_g128", head_dim=64))
    )


def test_ablations_differ_from_kvarn_only_where_they_should():
    k, v = kv_like(1, 128, 1, 64)
    full = get_method("k2v2_g128", head_dim=64)
    norot = get_method("kvarn-norot-k2v2", head_dim=64)
    nonorm = get_method("kvarn-nonorm-k2v2", head_dim=64)
    assert norot.layout.page_bytes == full.layout.page_bytes
    assert nonorm.layout.page_bytes < full.layout.page_bytes  # no norm vectors stored
    results = [m.dequantize_pages(m.quantize_pages(k, v))[0] for m in (full, norot, nonorm)]
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


def test_get_method_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown method 'kivi3'"):
        get_method("kivi3")


def test_method_rejects_misshapen_input_and_records():
    m = get_method("kivi2", head_dim=64)
    with pytest.raises(
        ValueError, match=r"Invalid shape of k: expected \[num_pages, 128, num_kv_heads, 64\]"
    ):
        m.quantize_pages(torch.zeros(1, 64, 1, 64), torch.zeros(1, 64, 1, 64))
    with pytest.raises(ValueError, match="Invalid shape of records"):
        m.dequantize_pages(torch.zeros(1, 1, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="Unsupported dtype of v"):
        m.quantize_pages(torch.zeros(1, 128, 1, 64), torch.zeros(1, 128, 1, 64, dtype=torch.int8))


def test_methods_reject_non_finite_input():
    m = get_method("int4", head_dim=64)
    k, v = kv_like(2, 128, 1, 64)
    v[1, 3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="Non-finite values in v: page 1, kv head 0"):
        m.quantize_pages(k, v)


if __name__ == "__main__":
    test_every_method_round_trips_real_records("k4v2_g128", 128)
