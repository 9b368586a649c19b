from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCE, kv_like

from kvarn_sglang.format.config import PRESETS, get_preset
from kvarn_sglang.format.layout import decode_tiles
from kvarn_sglang.quant.reference import (
    _imbalance,
    _tiles,
    dequantize_oriented,
    dequantize_pages,
    hadamard_matrix,
    quantize_oriented,
    quantize_pages,
    rotate,
    rtn_quantize,
    variance_normalize,
)

HEAD_DIMS = [64, 128, 256]
# Relative Frobenius error bounds on kv_like data, per code width (measured: 4-bit <= 0.11,
# 2-bit <= 0.54 over every preset and head_dim).
REL_ERROR_BOUND = {4: 0.12, 2: 0.56}


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_hadamard_is_orthonormal_symmetric_and_self_inverse(d):
    h = hadamard_matrix(d)
    eye = torch.eye(d)
    torch.testing.assert_close(h @ h.T, eye, atol=1e-6, rtol=0)
    assert torch.equal(h, h.T)
    x = torch.randn(5, d)
    torch.testing.assert_close(rotate(rotate(x)), x, atol=1e-5, rtol=1e-5)


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="Unsupported head_dim 80"):
        hadamard_matrix(80)


def test_batched_normalization_equals_per_tile_normalization():
    tiles = torch.randn(6, 64, 128) * torch.logspace(-2, 2, 6).view(6, 1, 1)
    tiles[2, :, 7] *= 50  # one tile with an outlier column changes only its own best scales
    rows, cols = variance_normalize(tiles, 8)
    for i in range(tiles.shape[0]):
        r, c = variance_normalize(tiles[i : i + 1], 8)
        torch.testing.assert_close(rows[i : i + 1], r, atol=0, rtol=1e-6)
        torch.testing.assert_close(cols[i : i + 1], c, atol=0, rtol=1e-6)


def test_normalization_never_increases_imbalance():
    tiles = torch.randn(8, 128, 64) * torch.rand(8, 128, 1) * torch.rand(8, 1, 64) * 10
    rows, cols = variance_normalize(tiles, 8)
    assert (_imbalance(tiles / cols / rows) <= _imbalance(tiles) + 1e-4).all()
    assert (_imbalance(tiles / cols / rows) < 0.5 * _imbalance(tiles)).all()


def test_rtn_codes_and_range():
    x = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    codes, scale, zero = rtn_quantize(x, 2)
    assert codes.tolist() == [[[0, 1, 2, 3]]]
    assert scale.item() == pytest.approx(1.0) and zero.item() == 0.0


def test_rtn_quantile_clipping_narrows_the_range():
    x = torch.randn(1, 4, 256)
    x[0, :, 0] = 100.0
    _, scale_full, _ = rtn_quantize(x, 4)
    _, scale_clip, _ = rtn_quantize(x, 4, clip_quantile=0.01)
    assert (scale_clip < 0.2 * scale_full).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_absorbed_scales_reproduce_the_unabsorbed_reconstruction(bits):
    m = torch.randn(4, 128, 64) * torch.rand(4, 1, 64) * 5
    row_norm, col_norm = variance_normalize(m, 8)
    codes, scale, zero = rtn_quantize(m / col_norm / row_norm, bits)
    unabsorbed = (codes.float() * scale + zero) * row_norm * col_norm
    absorbed = dequantize_oriented(quantize_oriented(m, bits, 8))
    atol, rtol = TOLERANCE[torch.float16]
    torch.testing.assert_close(absorbed, unabsorbed, atol=atol * m.abs().max().item(), rtol=rtol)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_element_is_within_half_a_step_of_its_input(name, d):
    """In the rotated domain |x^ - x| <= scale[r] * norm[c] / 2, plus fp16 metadata rounding."""
    cfg = get_preset(name, head_dim=d)
    k, v = kv_like(2, cfg.page_size, 2, d, seed=d)
    k_t, v_t = decode_tiles(quantize_pages(k, v, cfg), cfg.layout)
    for x, t, per_channel, bits in ((k, k_t, True, cfg.k_bits), (v, v_t, False, cfg.v_bits)):
        m = _tiles(rotate(x), per_channel)
        scale, zero, norm = (
            t.scale.float()[:, :, None],
            t.zero.float()[:, :, None],
            t.norm.float()[:, None, :],
        )
        step = scale.abs() * norm.abs()
        slack = (zero.abs() + (2**bits - 1) * scale.abs()) * norm.abs() * 2.0**-10
        err = (dequantize_oriented(t) - m).abs()
        assert (err <= step / 2 + slack + 1e-6).all(), (
            name,
            d,
            float((err - step / 2 - slack).max()),
        )


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_error_bounds(name, d):
    cfg = get_preset(name, head_dim=d)
    k, v = kv_like(3, cfg.page_size, 2, d, seed=1)
    records = quantize_pages(k, v, cfg)
    assert records.shape == (3, 2, cfg.page_bytes) and records.dtype == torch.uint8
    kd, vd = dequantize_pages(records, cfg)
    assert (kd - k).norm() / k.norm() < REL_ERROR_BOUND[cfg.k_bits]
    assert (vd - v).norm() / v.norm() < REL_ERROR_BOUND[cfg.v_bits]


def test_rotated_dequantization_is_the_rotation_of_the_plain_one():
    cfg = get_preset("k4v4_g64", head_dim=64)
    k, v = kv_like(2, 64, 1, 64)
    records = quantize_pages(k, v, cfg)
    kr, vr = dequantize_pages(records, cfg, rotated=True)
    kd, vd = dequantize_pages(records, cfg)
    torch.testing.assert_close(rotate(kr), kd, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(rotate(vr), vd, atol=1e-4, rtol=1e-5)


def test_pages_and_heads_are_quantized_independently():
    cfg = get_preset("k2v2_g64", head_dim=64)
    k, v = kv_like(3, 64, 2, 64)
    batch = quantize_pages(k, v, cfg)
    for p in range(3):
        for h in range(2):
            alone = quantize_pages(k[p : p + 1, :, h : h + 1], v[p : p + 1, :, h : h + 1], cfg)
            assert torch.equal(batch[p, h], alone[0, 0])


def test_clip_quantile_changes_the_codes_and_stays_bounded():
    cfg = get_preset("k2v2_g128", head_dim=64)
    k, v = kv_like(2, 128, 1, 64)
    plain = quantize_pages(k, v, cfg)
    clipped_cfg = get_preset("k2v2_g128", head_dim=64, clip_quantile=0.02)
    clipped = quantize_pages(k, v, clipped_cfg)
    assert not torch.equal(plain, clipped)
    _kd, vd = dequantize_pages(clipped, clipped_cfg)
    assert (vd - v).norm() / v.norm() < REL_ERROR_BOUND[2]


if __name__ == "__main__":
    test_preset_error_bounds("k4v2_g128", 128)
