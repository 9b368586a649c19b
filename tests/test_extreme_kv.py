"""K/V at the extremes the model dtypes allow: nothing crashes, nothing cached is poisoned.

* fp16 models: K/V up to fp16's maximum (65504) quantize to finite metadata (the reference and
  the Triton commit alike), and attention over pages whose K scales times the query pass
  fp16's range (``q * k_scale`` is rounded to fp16 in the kernels) stays finite and matches
  the reference, in decode and extend.
* bf16 models: finite K far beyond what a page's fp16 scales can hold (the normalization
  absorbs up to e^10 per token and per channel) used to make the CPU reference raise inside
  the forward pass (the scheduler died) and the Triton commit store Inf scales (a cached
  prefix then poisoned every later hit). Now every commit's scales are checked in the pass
  (``request_guard.guard_scales``): the page's scales are zeroed, its request is flagged
  like one whose K/V turned non-finite and fails alone, and no other request changes.
"""

from __future__ import annotations

import random

import pytest
import torch
from paged_helpers import build_cache, device
from sglang_harness import SimServer

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.numerics import PAGE_VALUE_MAX
from kvarn_sglang.kernels.commit import commit_pages
from kvarn_sglang.kernels.decode import decode_attention
from kvarn_sglang.kernels.extend import extend_attention
from kvarn_sglang.quant.reference import (
    dequantize_pages,
    quantize_pages,
    ref_decode_attention,
    ref_extend_attention,
    rotate,
)
from kvarn_sglang.serving.forward_plan import build_plan
from kvarn_sglang.serving.page_store import PageStore
from kvarn_sglang.serving.request_guard import flagged_rows, screen

G = 64
CFG = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=1)
SCALES = ("k_scale", "k_zero", "k_norm", "v_scale", "v_zero", "v_norm")
FP16_MAX = torch.finfo(torch.float16).max
BF16_MAX = torch.finfo(torch.bfloat16).max


def _fp16_extreme_pages() -> tuple[torch.Tensor, torch.Tensor]:
    """Four fp16 pages at fp16's maximum: one token, a whole page, random data scaled to the
    maximum, alternating signs."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, G, 1, 64, generator=gen)
    k = base.clone()
    k[0, 5] = FP16_MAX
    k[1] = FP16_MAX
    k[2] = k[2] / k[2].abs().max() * FP16_MAX
    k[3] = FP16_MAX * torch.sign(base[3])
    return k.half(), k.flip(1).half()


def test_fp16_at_its_maximum_commits_finite_scales_reference_and_kernel():
    k, v = _fp16_extreme_pages()
    cfg = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=0)
    ref = quantize_pages(k, v, cfg)
    dev = device()
    out = torch.zeros(5, 1, cfg.page_bytes, dtype=torch.uint8, device=dev)
    commit_pages(k.to(dev), v.to(dev), cfg, out, torch.arange(1, 5, device=dev))
    for records in (ref, out[1:].cpu()):
        parts = cfg.layout.unpack(records)
        assert all(torch.isfinite(parts[n].float()).all() for n in SCALES)
        kd, vd = dequantize_pages(records, cfg)
        assert torch.isfinite(kd).all() and torch.isfinite(vd).all()
        err = (kd - k.float()).norm() / k.float().norm()
        assert err < 0.1, err


def _fp16_big_k_scale_case():
    """fp16 K with outlier channels (after the rotation every K scale is large) and a large
    fp16 query: ``q * k_scale`` passes fp16's range on the committed pages."""
    gen = torch.Generator().manual_seed(7)
    n, hkv, group = 2 * G + 3, 1, 4
    k = torch.randn(n, hkv, 64, generator=gen)
    k[..., :4] *= 1.5e4
    k = k.half().float()
    v = (torch.randn(n, hkv, 64, generator=gen) * 300).half().float()
    q = (torch.randn(n, hkv * group, 64, generator=gen) * 3000).half().float()
    cfg = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=0)
    return cfg, q, k, v


def _assert_overflows_fp16(cache, table, q, cfg) -> None:
    k_scale = cfg.layout.unpack(cache.packed[table[0, :2]])["k_scale"].float()
    qs = rotate(q.float()).amax(0)[:, None, None, :] * k_scale
    assert qs.abs().max() > FP16_MAX, "the case must exceed fp16's range"


def test_fp16_decode_and_extend_with_q_times_k_scale_beyond_fp16():
    cfg, q, k, v = _fp16_big_k_scale_case()
    n, dev, sm_scale = k.shape[0], device(), 1e-7  # logits of order 1 despite the magnitudes
    cache, table = build_cache([(k, v, n, {n // G})], cfg)
    _assert_overflows_fp16(cache, table, q, cfg)
    dev_cache, dev_table = build_cache([(k, v, n, {n // G})], cfg, device=dev)
    lens = torch.tensor([n])
    ref = ref_decode_attention(q[-1:], cache, table, lens, cfg, sm_scale)
    out = decode_attention(q[-1:].half().to(dev), dev_cache, dev_table, lens.to(dev), cfg, sm_scale)
    assert torch.isfinite(out).all()
    # fp16 operands at these magnitudes: a few percent of the output's maximum.
    atol = 5e-2 * ref.abs().max().item()
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=3e-2)
    # Extend: the last 3 tokens over the two committed pages.
    pre, ext = torch.tensor([n - 3]), torch.tensor([3])
    cache, table = build_cache([(k, v, n - 3, {(n - 3) // G})], cfg)
    dev_cache, dev_table = build_cache([(k, v, n - 3, {(n - 3) // G})], cfg, device=dev)
    args = (q[-3:], k[-3:].half(), v[-3:].half())
    ref = ref_extend_attention(*args, cache, table, pre, ext, cfg, sm_scale)
    out = extend_attention(
        *(x.half().to(dev) for x in args), dev_cache, dev_table, pre.to(dev), ext.to(dev),
        cfg, sm_scale,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=3e-2)


def test_screen_stores_values_no_page_can_hold_as_zeros_and_flags_their_row():
    """A head whose L2 norm passes ``PAGE_VALUE_MAX * sqrt(D)`` has a rotated element beyond
    what any page reconstructs; below it the commit's scales check decides."""
    limit = PAGE_VALUE_MAX * 8.0  # head_dim 64
    k = torch.zeros(5, 1, 64, dtype=torch.bfloat16)
    k[1, 0, 0] = limit * 1.01  # beyond (bf16 rounds by less than 1%)
    k[2, 0, 0] = limit * 0.99
    k[3, 0, 0] = float("nan")
    k[4, 0, 0] = BF16_MAX
    v = torch.ones_like(k)
    plan = build_plan(torch.zeros(2, 64, dtype=torch.int32), torch.tensor([0, 1]), [0, 0], [2, 3],
                      G, 1)  # fmt: skip
    k2, v2 = screen(k, v, plan, layer_id=4)
    assert plan.bad_layer.tolist() == [4, 4] and flagged_rows(plan, 2) == {0: 4, 1: 4}
    assert torch.equal(k2[2], k[2]) and (k2[[1, 3, 4]] == 0).all() and (v2[[1, 3, 4]] == 0).all()
    plan = build_plan(torch.zeros(2, 64, dtype=torch.int32), torch.tensor([0, 1]), [0, 0], [3, 2],
                      G, 1)  # fmt: skip
    screen(k[[0, 2, 0, 0, 0]], v, plan, layer_id=4)
    assert flagged_rows(plan, 2) == {}


# ------------------------------------------------------------------ through the pass
POISON = 63  # the token whose K is huge (finite) in ``BAD_LAYER``
BAD_LAYER = 1


class HugeKServer(SimServer):
    """``SimServer`` on a bf16 pool whose "model" writes a finite ``value`` into one channel
    of K in ``BAD_LAYER`` for the token ``POISON``."""

    def __init__(self, value: float | None, **kw) -> None:
        super().__init__(CFG, layers=3, dtype=torch.bfloat16, **kw)
        self.value = value

    def qkv(self, layer: int, tokens: list[int], start: int):
        q, k, v = super().qkv(layer, tokens, start)
        q, k, v = (x.bfloat16().float() for x in (q, k, v))
        if layer == BAD_LAYER and self.value is not None:
            k = k.clone()
            k[torch.tensor(tokens) == POISON, 0, 3] = self.value
        return q, k, v


def _run(value: float | None):
    """A cached prefix, then one extend over three requests; the first writes a huge K in a
    page the pass completes (unless ``value`` is None)."""
    server = HugeKServer(value, num_pages=24)
    rng = random.Random(0)
    tokens = [rng.randrange(POISON) for _ in range(6 * G)]
    shared, tails = tokens[: G + 3], [tokens[2 * G : 3 * G + 5], tokens[4 * G : 5 * G + 5]]
    warm = server.start(shared)
    assert server.extend([warm], [len(shared)])
    server.finish(warm)
    tails[0][10] = POISON
    reqs = [server.start(shared[:G] + tails[0]), server.start(tokens[3 * G : 4 * G + 9]),
            server.start(shared[:G] + tails[1])]  # fmt: skip
    cached = [p.clone() for p in server.pool.store.packed]
    assert server.extend(reqs, [len(r.tokens) - r.cached_len for r in reqs])
    return server, reqs, cached


# 1e11 in one channel passes the screen and overflows the page's scales at commit; bf16's
# maximum is beyond any page (the screen stores it as zeros).
@pytest.mark.parametrize("value", [1e11, BF16_MAX], ids=["1e11", "bf16_max"])
def test_k_beyond_the_page_scales_fails_its_request_alone(value):
    server, reqs, cached = _run(value)
    _, clean, _ = _run(None)
    plan, store = server.backend.plan, server.pool.store
    assert flagged_rows(plan, 3) == {0: BAD_LAYER}
    for r, c in zip(reqs[1:], clean[1:], strict=True):  # the others compute what they would
        for pos, outs in r.outputs.items():
            for layer, out in enumerate(outs):
                assert torch.equal(out, c.outputs[pos][layer]), (r.row, pos, layer)
    for layer in range(len(server.layers)):  # no record holds a non-finite scale
        parts = CFG.layout.unpack(store.packed[layer])
        assert all(torch.isfinite(parts[n].float()).all() for n in SCALES), layer
    assert all(torch.isfinite(o).all() for outs in reqs[0].outputs.values() for o in outs)
    # The cached prefix's pages are untouched (the tree page is page-aligned: the first page).
    first = int(server.req_pool.req_to_token[reqs[2].row, 0]) // G
    assert all(torch.equal(p[first], c[first]) for p, c in zip(store.packed, cached, strict=True))
    server.abort(reqs[0])
    for r in reqs[1:]:
        server.finish(r)
    assert server.alloc.verify_byte_accounting() == []


@pytest.mark.parametrize("value", [1e12, BF16_MAX], ids=["1e12", "bf16_max"])
def test_the_triton_commit_stores_inf_scales_and_check_scales_catches_them(value):
    """The kernel does not check the range (one host synchronisation less): its Inf/NaN
    scales are found by ``PageStore.check_scales``, which zeroes them, and only there."""
    store = PageStore(CFG, num_pages=4, num_slots=1, layer_num=1, head_num=1,
                      dtype=torch.bfloat16, device=device())  # fmt: skip
    store.use_kernels = True
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, G, 1, 64, generator=gen)
    k[0, 10, 0, 3] = value
    v = torch.randn(2, G, 1, 64, generator=gen)
    pages = torch.tensor([2, 3], device=device())
    store.commit(0, pages, k.bfloat16().to(device()), v.bfloat16().to(device()), check_finite=False)
    scales = CFG.layout.unpack(store.packed[0][pages].cpu())
    assert not all(torch.isfinite(scales[n][0].float()).all() for n in SCALES)
    before = store.packed[0][3].clone()
    ok = store.check_scales(0, torch.tensor([2, 0, 3], device=device()))
    assert ok.tolist() == [False, True, True]
    scales = CFG.layout.unpack(store.packed[0].cpu())
    assert all((scales[n][2] == 0).all() for n in SCALES)  # zeroed: reads as zeros
    assert torch.equal(store.packed[0][3], before)  # the good page is untouched


if __name__ == "__main__":
    test_fp16_decode_and_extend_with_q_times_k_scale_beyond_fp16()
