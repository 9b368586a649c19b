"""Decode and extend kernels against ``ref_decode_attention`` / ``ref_extend_attention``."""

from __future__ import annotations

import pytest
import torch
from paged_helpers import build_cache, covers_every_pair, device, fp16, sequence

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.numerics import PagedKVCache
from kvarn_sglang.kernels.decode import decode_attention
from kvarn_sglang.kernels.extend import extend_attention
from kvarn_sglang.quant.reference import ref_decode_attention, ref_extend_attention

G = 64
LENGTHS = [1, G - 1, G, G + 1, 2 * G + 3]
# fp16 tensor-core operands (queries times scales, probabilities): outputs agree with the fp32
# reference to about 1e-3 of their magnitude (measured up to 3.7e-3 absolute on outputs of
# magnitude 3-4).
ATOL, RTOL = 1e-2, 1e-2


def _config(d, k_bits, v_bits, sink, g=G):
    return KVarNConfig(k_bits=k_bits, v_bits=v_bits, page_size=g, head_dim=d, sink_pages=sink)


def _decode_batch(cfg, group, hkv=2):
    g = cfg.page_size
    reqs, qs, lens = [], [], []
    for i, n in enumerate([1, g - 1, g, g + 1, 2 * g + 3]):
        q, k, v = sequence(n, hkv * group, hkv, cfg.head_dim, seed=i)
        own = (n - 1) // g
        reqs.append((fp16(k), fp16(v), n, set(range(min(cfg.sink_pages, own))) | {own}))
        qs.append(q[-1])
        lens.append(n)
    return reqs, torch.stack(qs), torch.tensor(lens)


# Every (head_dim, bit widths) pair once, with the GQA group and the sink pages varied so that
# every pair of values of any two parameters occurs (12 cases instead of all 48: no code path
# depends on more than two of them at once; see EXTEND_CASES).
DECODE_CASES = [
    (64, (4, 2), 1, 0), (64, (4, 4), 4, 0), (64, (2, 2), 1, 1), (64, (2, 4), 4, 1),
    (128, (4, 2), 4, 1), (128, (4, 4), 1, 1), (128, (2, 2), 4, 0), (128, (2, 4), 1, 0),
    (256, (4, 2), 1, 0), (256, (4, 4), 4, 0), (256, (2, 2), 1, 1), (256, (2, 4), 4, 1),
]  # fmt: skip
assert covers_every_pair(
    DECODE_CASES, [64, 128, 256], [(4, 2), (4, 4), (2, 2), (2, 4)], [1, 4], [0, 1]
)


@pytest.mark.parametrize("d, bits, group, sink", DECODE_CASES, ids=str)
def test_decode_matches_reference(d, bits, group, sink):
    cfg = _config(d, *bits, sink)
    reqs, q, lens = _decode_batch(cfg, group)
    cache, table = build_cache(reqs, cfg)
    ref = ref_decode_attention(q, cache, table, lens, cfg, d**-0.5)
    dev_cache, dev_table = build_cache(reqs, cfg, device=device())
    out = decode_attention(q.to(device()), dev_cache, dev_table, lens.to(device()), cfg, d**-0.5)
    torch.testing.assert_close(out.float().cpu(), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_decode_split_count_does_not_change_the_result(splits):
    cfg = _config(64, 4, 2, 1)
    reqs, q, lens = _decode_batch(cfg, 4)
    cache, table = build_cache(reqs, cfg, device=device())
    args = (q.to(device()), cache, table, lens.to(device()), cfg, 0.125)
    one = decode_attention(*args, max_splits=1)
    # Only the fp16 rounding of probabilities (relative to each split's maximum) changes.
    split = decode_attention(*args, max_splits=splits)
    torch.testing.assert_close(split, one, atol=5e-3, rtol=5e-3)


def test_decode_page_size_128_and_bf16_slots():
    cfg = _config(128, 4, 2, 1, g=128)
    reqs, q, lens = _decode_batch(cfg, 4)
    cache, table = build_cache(reqs, cfg)
    ref = ref_decode_attention(q, cache, table, lens, cfg, 128**-0.5)
    bf = PagedKVCache(
        cache.packed, cache.slot_k.bfloat16(), cache.slot_v.bfloat16(), cache.page_slot
    )
    bf = PagedKVCache(*(t.to(device()) for t in (bf.packed, bf.slot_k, bf.slot_v, bf.page_slot)))
    out = decode_attention(
        q.bfloat16().to(device()), bf, table.to(device()), lens.to(device()), cfg, 128**-0.5
    )
    torch.testing.assert_close(out.float().cpu(), ref, atol=3e-2, rtol=3e-2)


def _extend_case(cfg, group, spans, hkv=2):
    g = cfg.page_size
    reqs, qs, ks, vs = [], [], [], []
    for i, (pre, ext) in enumerate(spans):
        q, k, v = sequence(pre + ext, hkv * group, hkv, cfg.head_dim, seed=20 + i)
        k, v = fp16(k), fp16(v)
        pages = set(range(min(cfg.sink_pages, -(-(pre + ext) // g))))
        if pre % g:
            pages.add(pre // g)
        reqs.append((k, v, pre + ext, pages))
        qs.append(q[pre:])
        ks.append(k[pre:])
        vs.append(v[pre:])
    pres = torch.tensor([p for p, _ in spans])
    exts = torch.tensor([e for _, e in spans])
    return reqs, torch.cat(qs), torch.cat(ks).half(), torch.cat(vs).half(), pres, exts


SPANS = [(0, 1), (0, 2 * G + 3), (G - 1, G + 1), (G, G - 1), (2 * G + 1, 3)]


# Every value of each parameter, and every pair of values of any two parameters, in 6 cases
# instead of all 24 combinations: head_dim sets the kernel's block shapes, the bit widths its
# unpacking, the GQA group its head indexing and the sink its page reads, and no code path
# depends on more than two of them at once. (In Triton's interpreter the full product cost
# ~450 s of CI on one core.)
EXTEND_CASES = [
    (64, (4, 2), 1, 0), (64, (2, 4), 4, 1), (128, (4, 2), 4, 1),
    (128, (2, 4), 1, 0), (256, (4, 2), 1, 1), (256, (2, 4), 4, 0),
]  # fmt: skip
assert covers_every_pair(EXTEND_CASES, [64, 128, 256], [(4, 2), (2, 4)], [1, 4], [0, 1])


@pytest.mark.parametrize("d, bits, group, sink", EXTEND_CASES, ids=str)
def test_extend_matches_reference(d, bits, group, sink):
    cfg = _config(d, *bits, sink)
    reqs, q, k, v, pres, exts = _extend_case(cfg, group, SPANS)
    cache, table = build_cache(reqs, cfg)
    ref = ref_extend_attention(q, k, v, cache, table, pres, exts, cfg, d**-0.5)
    dc, dt = build_cache(reqs, cfg, device=device())
    dev = device()
    out = extend_attention(q.to(dev), k.to(dev), v.to(dev), dc, dt, pres, exts, cfg, d**-0.5)
    torch.testing.assert_close(out.float().cpu(), ref, atol=ATOL, rtol=RTOL)


def test_extend_cache_hit_equals_cold_prefill_and_decode():
    """One prefill, the same tokens in chunks (prefix from the cache) and a decode of the
    last token compute the same outputs."""
    cfg = _config(64, 4, 2, 1)
    n, dev = 2 * G + 3, device()
    q, k, v = sequence(n, 8, 2, 64, seed=3)
    k, v = fp16(k), fp16(v)
    cold_cache, table = build_cache([(k, v, n, {0})], cfg, device=dev)
    cold = extend_attention(
        q.to(dev), k.half().to(dev), v.half().to(dev), cold_cache, table,
        torch.tensor([0]), torch.tensor([n]), cfg, 0.125,
    )  # fmt: skip
    chunks, pre = [], 0
    for c in (G - 1, G + 2, 2):
        end = pre + c
        pages = {0} | ({pre // G} if pre % G else set())
        cache, table = build_cache([(k, v, end, pages)], cfg, device=dev)
        chunks.append(
            extend_attention(
                q[pre:end].to(dev),
                k[pre:end].half().to(dev),
                v[pre:end].half().to(dev),
                cache,
                table,
                torch.tensor([pre]),
                torch.tensor([c]),
                cfg,
                0.125,
            )
        )
        pre = end
    torch.testing.assert_close(torch.cat(chunks), cold, atol=1e-3, rtol=1e-3)
    cache, table = build_cache([(k, v, n, {0, (n - 1) // G})], cfg, device=dev)
    dec = decode_attention(q[-1:].to(dev), cache, table, torch.tensor([n], device=dev), cfg, 0.125)
    torch.testing.assert_close(dec, cold[-1:], atol=1e-3, rtol=1e-3)


def _valid_decode_args():
    cfg = _config(64, 4, 2, 1)
    reqs, q, lens = _decode_batch(cfg, 1)
    cache, table = build_cache(reqs, cfg)
    return q, cache, table, lens, cfg


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (
            lambda a: {**a, "q": a["q"][..., :32]},
            ValueError,
            r"Invalid shape of q: expected \[\*, \*, 64\]",
        ),
        (lambda a: {**a, "q": a["q"].double()}, TypeError, "Unsupported dtype of q"),
        (
            lambda a: {**a, "q": torch.cat([a["q"], a["q"][:, :1]], 1)},
            ValueError,
            "3 query heads are not a multiple of 2 KV heads",
        ),
        (
            lambda a: {**a, "table": a["table"].float()},
            TypeError,
            "Unsupported dtype of page_table",
        ),
        (lambda a: {**a, "lens": a["lens"][:2]}, ValueError, "Invalid shape of seq_lens"),
        (
            lambda a: {
                **a,
                "cache": PagedKVCache(
                    a["cache"].packed[..., :-16],
                    a["cache"].slot_k,
                    a["cache"].slot_v,
                    a["cache"].page_slot,
                ),
            },
            ValueError,
            "Invalid shape of packed",
        ),
        (
            lambda a: {
                **a,
                "cache": PagedKVCache(
                    a["cache"].packed,
                    a["cache"].slot_k.float(),
                    a["cache"].slot_v,
                    a["cache"].page_slot,
                ),
            },
            TypeError,
            "Unsupported dtype of slot_k",
        ),
    ],
    ids=["head_dim", "dtype", "gqa", "table", "seq_lens", "packed", "slots"],
)
def test_decode_rejects_bad_inputs(mutate, error, message):
    q, cache, table, lens, cfg = _valid_decode_args()
    a = mutate({"q": q, "cache": cache, "table": table, "lens": lens})
    with pytest.raises(error, match=message):
        decode_attention(a["q"], a["cache"], a["table"], a["lens"], cfg, 0.125)


def test_extend_rejects_bad_inputs():
    cfg = _config(64, 4, 2, 1)
    reqs, q, k, v, pres, exts = _extend_case(cfg, 1, [(0, 5)])
    cache, table = build_cache(reqs, cfg)
    with pytest.raises(ValueError, match=r"Invalid shape of k_new: expected \[5, 2, 64\]"):
        extend_attention(q, k[:4], v, cache, table, pres, exts, cfg, 0.125)
    with pytest.raises(ValueError, match="Invalid extend_lens: they sum to 4, q has 5 tokens"):
        extend_attention(q, k, v, cache, table, pres, exts - 1, cfg, 0.125)
    with pytest.raises(ValueError, match="Invalid shape of prefix_lens"):
        extend_attention(q, k, v, cache, table, pres.float(), exts, cfg, 0.125)
    with pytest.raises(ValueError, match="Invalid stride of k_new"):
        extend_attention(
            q,
            k.transpose(1, 2).contiguous().transpose(1, 2),
            v,
            cache,
            table,
            pres,
            exts,
            cfg,
            0.125,
        )


if __name__ == "__main__":
    test_decode_matches_reference(128, (4, 2), 4, 1)
