"""Property-based tests (hypothesis) of the quantizer, the packing and the commit kernel.

Inputs are random pages of every preset and head_dim: magnitudes from 1e-6 to 6e4, outlier
channels, tokens and elements (up to 1e4 times the rest), constant and zero tokens or
channels, all-zero and all-constant pages, in fp16, bf16 and fp32.

The stated error bound. In the Hadamard-rotated domain, an oriented tile (K: rows = channels,
V: rows = tokens) is reconstructed as ``x^[r, c] = (code * s[r] + z[r]) * n[c]``. The codes
round the balanced tile to the nearest of ``2**bits`` steps per row, so before the metadata is
rounded to fp16 every element is within half a step: ``|x - x^| <= s[r] * n[c] / 2``. Rounding
``s``, ``z`` and ``n`` to fp16 (relative error ``u = 2**-11`` in the normal range, absolute
``e = 2**-25`` below it) adds at most ``(qmax * ds + dz) * N + (qmax * S + Z) * dn`` with
``ds <= u * S + e`` etc., where ``S, Z, N`` bound the unrounded magnitudes from the stored
values (``S = (|s^| + e) / (1 - u)``). ``element_bound`` computes this, plus 1e-6 relative
slack for fp32 arithmetic. The rotation is orthonormal, so in the model's domain the L2 error
of each token's K or V vector is bounded by the L2 norm of its elements' bounds.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvarn_sglang.format.config import PRESETS, get_preset
from kvarn_sglang.format.layout import (
    TileCodes,
    decode_tiles,
    encode_tiles,
    pack_codes,
    unpack_codes,
)
from kvarn_sglang.quant.reference import (
    _tiles,
    dequantize_oriented,
    dequantize_pages,
    quantize_pages,
    rotate,
)
from kvarn_sglang.serving.page_store import PageStore

U16, E16, F32_SLACK = 2.0**-11, 2.0**-25, 1e-6
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
PATTERNS = [
    "gaussian",
    "outlier_channels",
    "outlier_tokens",
    "outlier_element",
    "constant_tokens",
    "constant_channels",
    "zero_tokens",
    "zero_channels",
    "all_zero",
    "all_constant",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiles here are small: intra-op threads only add overhead (several times slower on a
    loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pattern(shape, pattern: str, magnitude: float, factor: float, gen) -> torch.Tensor:
    """fp32 ``[P, G, H, D]`` of the pattern, scaled so that its largest |value| is magnitude."""
    p, g, h, d = shape
    x = torch.randn(shape, generator=gen)
    pick = lambda n, k: torch.randperm(n, generator=gen)[:k]  # noqa: E731
    if pattern == "outlier_channels":
        x[..., pick(d, 3)] *= factor
    elif pattern == "outlier_tokens":
        x[:, pick(g, 2)] *= factor
    elif pattern == "outlier_element":
        x[pick(p, 1), pick(g, 1), pick(h, 1), pick(d, 1)] *= factor
    elif pattern == "constant_tokens":
        x = torch.randn(p, g, h, 1, generator=gen).expand(shape).clone()
    elif pattern == "constant_channels":
        x = torch.randn(p, 1, h, d, generator=gen).expand(shape).clone()
    elif pattern == "zero_tokens":
        x[:, pick(g, g // 4)] = 0
    elif pattern == "zero_channels":
        x[..., pick(d, d // 4)] = 0
    elif pattern == "all_zero":
        x.zero_()
    elif pattern == "all_constant":
        x.fill_(-1.0)
    return x * (magnitude / x.abs().amax().clamp_min(1e-30))


@st.composite
def kv_pages(draw, head_dims=(64, 128, 256), dtypes=DTYPES, max_pages=3, max_heads=3):
    """(config, k, v): random pages of a random preset, K and V with their own pattern."""
    cfg = get_preset(
        draw(st.sampled_from(sorted(PRESETS))), head_dim=draw(st.sampled_from(head_dims))
    )
    shape = (
        draw(st.integers(1, max_pages)),
        cfg.page_size,
        draw(st.integers(1, max_heads)),
        cfg.head_dim,
    )
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    out = []
    for _ in ("k", "v"):
        pattern = draw(st.sampled_from(PATTERNS))
        magnitude = 10 ** draw(st.floats(-6.0, math.log10(6e4)))
        factor = 10 ** draw(st.floats(0.0, 4.0))
        out.append(_pattern(shape, pattern, magnitude, factor, gen).to(dtype))
    return cfg, out[0], out[1]


def element_bound(t: TileCodes, bits: int) -> torch.Tensor:
    """The stated bound on ``|x - x^|`` per element of oriented tiles ``[N, R, C]`` (see the
    module docstring), from the stored fp16 metadata."""
    qmax = 2**bits - 1
    s = (t.scale.float().abs().unsqueeze(2) + E16) / (1 - U16)
    z = (t.zero.float().abs().unsqueeze(2) + E16) / (1 - U16)
    n = (t.norm.float().abs().unsqueeze(1) + E16) / (1 - U16)
    step = s * n / 2
    meta = (qmax * (U16 * s + E16) + U16 * z + E16) * n + (qmax * s + z) * (U16 * n + E16)
    return step + meta + F32_SLACK * (qmax * s + z) * n


def _check_bound(k, v, records, cfg) -> None:
    """Rotated-domain per-element bound and model-domain per-token L2 bound, for K and V."""
    p, _, h, _ = k.shape
    k_t, v_t = decode_tiles(records, cfg.layout)
    kd, vd = dequantize_pages(records, cfg)
    for name, x, t, bits, per_channel, xd in (
        ("k", k, k_t, cfg.k_bits, True, kd),
        ("v", v, v_t, cfg.v_bits, False, vd),
    ):
        assert torch.isfinite(xd).all(), f"non-finite reconstruction of {name}"
        tiles = _tiles(rotate(x), per_channel)
        err = (dequantize_oriented(t) - tiles).abs()
        bound = element_bound(t, bits) + F32_SLACK * tiles.abs()
        worst = float((err / bound).max())
        assert worst <= 1.0, f"{name}: error {worst:.3f}x the stated bound ({cfg.name})"
        # Model domain: per (page, token, head) L2 over channels.
        token_bound = bound.square().sum(1 if per_channel else 2).sqrt()  # [P*H, G]
        token_bound = token_bound.view(p, h, -1).transpose(1, 2)  # [P, G, H]
        err_l2 = (xd - x.float()).norm(dim=3)
        slack = 1e-5 * x.float().norm(dim=3) + 1e-30
        assert (err_l2 <= token_bound + slack).all(), f"{name}: token L2 error above the bound"


@given(kv_pages())
@settings(max_examples=100)
def test_finite_pages_reconstruct_within_the_stated_bound_and_re_encode_exactly(case):
    cfg, k, v = case
    records = quantize_pages(k, v, cfg)
    assert records.shape == (k.shape[0], k.shape[2], cfg.page_bytes)
    _check_bound(k, v, records, cfg)
    k_t, v_t = decode_tiles(records, cfg.layout)
    again = encode_tiles(k_t, v_t, cfg.layout, k.shape[0], k.shape[2])
    assert torch.equal(again, records), "decode_tiles/encode_tiles do not round-trip"


@given(kv_pages(head_dims=(64, 128)))
@settings(max_examples=30)
def test_each_page_and_head_quantizes_as_if_alone(case):
    """No page or head influences another: an outlier or a zero tile stays in its own tile."""
    cfg, k, v = case
    records = quantize_pages(k, v, cfg)
    for p in range(k.shape[0]):
        for h in range(k.shape[2]):
            alone = quantize_pages(k[p : p + 1, :, h : h + 1], v[p : p + 1, :, h : h + 1], cfg)
            assert torch.equal(alone[0, 0], records[p, h]), f"page {p}, head {h}"


@given(kv_pages(head_dims=(64, 128), dtypes=[torch.float16, torch.bfloat16]))
@settings(max_examples=30)
def test_half_precision_input_quantizes_like_its_float32_copy(case):
    cfg, k, v = case
    assert torch.equal(quantize_pages(k, v, cfg), quantize_pages(k.float(), v.float(), cfg))


@given(
    bits=st.sampled_from([2, 4, 8]),
    rows=st.integers(1, 5),
    groups=st.integers(1, 16),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=100)
def test_code_packing_round_trips_both_ways(bits, rows, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    cols = groups * (8 // bits)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (rows, cols * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)
    raw = torch.randint(0, 256, (rows, groups), generator=gen, dtype=torch.uint8)
    assert torch.equal(pack_codes(unpack_codes(raw, bits), bits), raw)


@st.composite
def poisoned(draw):
    """(config, k, v, bad positions [(which, page, token, head, channel)])."""
    cfg, k, v = draw(kv_pages(head_dims=(64,), dtypes=DTYPES, max_pages=4))
    p, g, h, d = k.shape
    bad = draw(
        st.lists(
            st.tuples(
                st.sampled_from("kv"),
                st.integers(0, p - 1),
                st.integers(0, g - 1),
                st.integers(0, h - 1),
                st.integers(0, d - 1),
            ),
            min_size=1,
            max_size=3,
        )
    )
    value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    for which, *pos in bad:
        (k if which == "k" else v)[tuple(pos)] = value
    return cfg, k, v, bad


def _first_bad(bad) -> tuple[str, int, int]:
    """What ``quantize_pages`` must name: K is checked before V, then pages, then heads."""
    which = "k" if any(b[0] == "k" for b in bad) else "v"
    page = min(b[1] for b in bad if b[0] == which)
    heads = sorted({b[3] for b in bad if b[0] == which and b[1] == page})
    return which, page, heads[0]


@given(poisoned())
@settings(max_examples=50)
def test_non_finite_input_is_refused_naming_the_first_bad_page_and_head(case):
    cfg, k, v, bad = case
    which, page, head = _first_bad(bad)
    with pytest.raises(
        ValueError, match=f"Non-finite values in {which}: page {page}, kv head {head}"
    ):
        quantize_pages(k, v, cfg)


@given(poisoned(), st.integers(0, 2))
@settings(max_examples=30)
def test_non_finite_commit_touches_no_page_head_or_layer(case, layer):
    """A poisoned commit raises before writing: every record of every layer, the commit counts
    and the slots are as before, and the same store then commits finite pages normally."""
    cfg, k, v, _ = case
    p, _, h, _ = k.shape
    slot_dtype = torch.bfloat16 if k.dtype == torch.bfloat16 else torch.float16
    store = PageStore(
        cfg, num_pages=p + 3, num_slots=2, layer_num=3, head_num=h, dtype=slot_dtype, device="cpu"
    )
    gen = torch.Generator().manual_seed(p * 7 + h)
    for records in store.packed:
        records.copy_(torch.randint(0, 256, records.shape, generator=gen, dtype=torch.uint8))
    before = [r.clone() for r in store.packed]
    pages = torch.arange(2, 2 + p)
    with pytest.raises(ValueError, match="Non-finite values"):
        store.commit(layer, pages, k, v)
    for i, (now, then) in enumerate(zip(store.packed, before, strict=True)):
        assert torch.equal(now, then), f"layer {i} changed"
    assert int(store.commits.sum()) == 0 and store.free_slots == 2
    store.commit(layer, pages, k.nan_to_num(0.0, 0.0, 0.0), v.nan_to_num(0.0, 0.0, 0.0))
    changed = [
        i
        for i, (now, then) in enumerate(zip(store.packed, before, strict=True))
        if not torch.equal(now, then)
    ]
    assert changed == [layer]
    assert torch.equal(store.packed[layer][2 + p :], before[layer][2 + p :])


@given(kv_pages(head_dims=(64,), dtypes=[torch.float16, torch.bfloat16], max_pages=1, max_heads=1))
@settings(max_examples=6)
def test_commit_kernel_stays_within_the_stated_bound(case):
    """The Triton commit kernel (interpreted on CPU) on random tiles: within the same bound,
    and codes equal to the reference's except at rare rounding ties."""
    from kvarn_sglang.kernels.commit import commit_pages

    cfg, k, v = case
    out = commit_pages(k, v, cfg)
    _check_bound(k, v, out, cfg)
    ref = quantize_pages(k, v, cfg)
    for got, want in zip(decode_tiles(out, cfg.layout), decode_tiles(ref, cfg.layout), strict=True):
        assert (got.codes != want.codes).float().mean() <= 1e-2


@given(poisoned())
@settings(max_examples=10)
def test_commit_kernel_refuses_non_finite_pages_before_writing(case):
    from kvarn_sglang.kernels.commit import commit_pages

    cfg, k, v, bad = case
    if k.dtype == torch.float32:
        k, v = k.half(), v.half()
    which, page, head = _first_bad(bad)
    out = torch.full((k.shape[0], k.shape[2], cfg.page_bytes), 7, dtype=torch.uint8)
    with pytest.raises(
        ValueError, match=f"Non-finite values in {which}: page {page}, kv head {head}"
    ):
        commit_pages(k, v, cfg, out)
    assert (out == 7).all()


if __name__ == "__main__":
    test_finite_pages_reconstruct_within_the_stated_bound_and_re_encode_exactly()
