"""The ``_plus`` presets: least-squares refits of every row at commit time, same records."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import kv_like
from paged_helpers import device

from kvarn_sglang.format.config import PRESETS, KVarNConfig, get_preset
from kvarn_sglang.format.layout import decode_tiles
from kvarn_sglang.kernels.commit import commit_pages
from kvarn_sglang.quant.reference import (
    dequantize_pages,
    quantize_pages,
    ref_commit_pages,
    refit_rows,
    rtn_quantize,
)

PLUS = [name for name in PRESETS if name.endswith("_plus")]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def test_plus_presets_store_the_plain_records():
    assert PLUS == ["k4v2_g128_plus", "k2v2_g128_plus"]
    for name in PLUS:
        plus, plain = get_preset(name, head_dim=64), get_preset(name[: -len("_plus")], head_dim=64)
        assert plus.refit_iters == 4 and plain.refit_iters == 0 and plus.name == name
        assert plus.layout == plain.layout and plus.page_bytes == plain.page_bytes


@pytest.mark.parametrize("cover", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_refit_never_raises_any_row_error_and_keeps_constant_rows(bits, cover):
    x = torch.randn(3, 16, 64) * torch.rand(3, 16, 1) * 4
    x[0, 0] = 0.25  # a constant row: its codes are all equal, nothing to fit
    w = torch.rand(3, 1, 64) + 0.1
    codes, scale, zero = rtn_quantize(x, bits)
    before = ((codes.float() * scale + zero - x).square() * w).sum(2)
    c2, s2, z2 = refit_rows(x, w, codes, scale, zero, bits, iters=4, cover=cover)
    after = ((c2.float() * s2 + z2 - x).square() * w).sum(2)
    assert (after <= before).all() and (after < before).float().mean() > 0.3
    assert c2.dtype == torch.uint8 and int(c2.max()) <= 2**bits - 1
    assert torch.equal(c2[0, 0], codes[0, 0]) and s2[0, 0] == scale[0, 0]
    same = refit_rows(x, w, codes, scale, zero, bits, iters=0)
    assert all(torch.equal(a, b) for a, b in zip(same, (codes, scale, zero), strict=True))
    worst = ((c2.float() * s2 + z2 - x).abs() / s2).amax()
    if cover:  # nothing clipped: every element within half a step, as min/max RTN
        assert worst <= 0.5 + 1e-4
    else:  # the unconstrained least-squares range clips the extremes
        assert worst > 0.6


@pytest.mark.parametrize("name", ["k4v2_g128", "k2v2_g128"])
def test_plus_lowers_the_reconstruction_error_of_the_same_records(name):
    k, v = kv_like(3, 128, 2, 64, seed=1)
    plain, plus = get_preset(name, head_dim=64), get_preset(f"{name}_plus", head_dim=64)
    rec_plain, rec_plus = quantize_pages(k, v, plain), quantize_pages(k, v, plus)
    assert rec_plus.shape == rec_plain.shape and not torch.equal(rec_plus, rec_plain)
    for got, want, x in zip(
        dequantize_pages(rec_plus, plain), dequantize_pages(rec_plain, plain), (k, v), strict=True
    ):
        assert _rel(got, x) < 0.97 * _rel(want, x)


@pytest.mark.parametrize(
    "d, k_bits, v_bits, g",
    [(64, 2, 2, 128), (64, 4, 2, 64), (64, 2, 4, 64), (128, 2, 4, 64), (128, 4, 4, 128)],
)
def test_commit_kernel_with_refit_matches_the_reference(d, k_bits, v_bits, g):
    cfg = KVarNConfig(k_bits=k_bits, v_bits=v_bits, page_size=g, head_dim=d, refit_iters=4)
    # Two pages of one KV head (the refit runs per tile; several heads are covered by
    # tests/test_kernels_commit.py): 4 programs per case in Triton's interpreter.
    p, h = 2, 1
    k, v = kv_like(p, g, h, d, seed=d + k_bits + v_bits, dtype=torch.float16)
    out = commit_pages(k.to(device()), v.to(device()), cfg).cpu()
    ref = ref_commit_pages(k, v, cfg)
    flips = []
    for got, want in zip(decode_tiles(out, cfg.layout), decode_tiles(ref, cfg.layout), strict=True):
        # A code may flip only where a last-bit fp32 difference meets a rounding tie; a refit
        # decision that differs there changes that row's scale and zero as well, so rows with
        # a flipped code are compared by their error only.
        assert (got.codes != want.codes).float().mean() <= 1e-3, (d, k_bits, v_bits, g)
        flips.append((got.codes != want.codes).any(dim=2, keepdim=True).expand_as(got.codes))
    # Same per-element layout as the dequantized pages [P, G, H, D] in the rotated domain.
    flip_k = flips[0].reshape(p, h, d, g).permute(0, 3, 1, 2)
    flip_v = flips[1].reshape(p, h, g, d).permute(0, 2, 1, 3)
    pairs = zip(
        dequantize_pages(out, cfg, rotated=True),
        dequantize_pages(ref, cfg, rotated=True),
        (flip_k, flip_v),
        strict=True,
    )
    for a, b, flip in pairs:
        scale = b.abs().amax(dim=(1, 3), keepdim=True)
        assert ((a - b).abs() <= 4e-3 * scale)[~flip].all(), (d, k_bits, v_bits, g)
    for a, b, x in zip(dequantize_pages(out, cfg), dequantize_pages(ref, cfg), (k, v), strict=True):
        assert _rel(a, x.float()) <= 1.001 * _rel(b, x.float()), (d, k_bits, v_bits, g)


def test_pool_and_backend_run_a_plus_preset_through_sglang():
    from sglang_harness import SimServer

    g = 64
    cfg = KVarNConfig(k_bits=2, v_bits=2, page_size=g, head_dim=64, refit_iters=4)
    server = SimServer(cfg)
    req = server.start([random.Random(1).randrange(64) for _ in range(2 * g + 4)])
    assert server.extend([req], [2 * g + 1])
    for _ in range(3):
        assert server.decode([req])
    for layer in range(len(server.layers)):
        want = server.expected(req.tokens[: req.kv_len], layer)
        for pos, outs in req.outputs.items():
            torch.testing.assert_close(outs[layer], want[pos], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"refit_iters": 9}, "Unsupported refit_iters 9: expected 0..8"),
        ({"refit_iters": -1}, "Unsupported refit_iters -1"),
        ({"refit_iters": 1, "clip_quantile": 0.01}, "Unsupported refit_iters 1 with clip_q"),
    ],
)
def test_config_rejects_bad_refit_iters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KVarNConfig(**kwargs)


if __name__ == "__main__":
    test_commit_kernel_with_refit_matches_the_reference(64, 2, 2, 128)
