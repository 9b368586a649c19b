"""Decode-consistent attention: paged decode and extend agree with the dense spec, and a
prefix served from the cache computes exactly what a cold prefill computes."""

from __future__ import annotations

import pytest
import torch
from paged_helpers import build_cache, fp16, sequence

from kvarn_sglang.format.config import get_preset
from kvarn_sglang.quant.reference import (
    dequantize_pages,
    quantize_pages,
    ref_decode_attention,
    ref_decode_consistent_attention,
    ref_extend_attention,
)

G = 64
LENGTHS = [1, 17, G - 1, G, G + 1, 2 * G + 3]


def _config(d: int, sink: int, name: str = "k4v2_g64"):
    return get_preset(name, head_dim=d, sink_pages=sink)


@pytest.mark.parametrize("sink", [0, 1])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("n", LENGTHS)
def test_decode_over_pages_equals_dense_attention_on_the_dequantized_cache(n, group, sink):
    d, hkv = 64, 2
    cfg = _config(d, sink)
    q, k, v = sequence(n, hkv * group, hkv, d, seed=n)
    k, v = fp16(k), fp16(v)
    own = (n - 1) // G
    cache, table = build_cache([(k, v, n, set(range(min(sink, own))) | {own})], cfg)
    out = ref_decode_attention(q[-1:], cache, table, torch.tensor([n]), cfg, d**-0.5)

    # Independent dense computation: sinks and the own page fp16, the rest dequantized.
    keys, vals = k.clone(), v.clone()
    for j in range(sink, own):
        kd, vd = dequantize_pages(
            quantize_pages(k[j * G : (j + 1) * G][None], v[j * G : (j + 1) * G][None], cfg), cfg
        )
        keys[j * G : (j + 1) * G], vals[j * G : (j + 1) * G] = kd[0], vd[0]
    kk = keys.repeat_interleave(group, 1).transpose(0, 1)
    vv = vals.repeat_interleave(group, 1).transpose(0, 1)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q[-1:].transpose(0, 1), kk, vv, scale=d**-0.5
    )
    torch.testing.assert_close(out, dense.transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("n", [G + 1, 2 * G + 3])
def test_paged_decode_equals_the_dense_spec(n, d):
    cfg = _config(d, 1, "k2v4_g128" if d == 256 else "k4v2_g64")
    g = cfg.page_size
    q, k, v = sequence(max(n, g + 1), 4, 1, d, seed=d)
    k, v = fp16(k), fp16(v)
    t = q.shape[0]
    dense = ref_decode_consistent_attention(q, k, v, cfg, d**-0.5)
    own = (t - 1) // g
    cache, table = build_cache([(k, v, t, {0, own})], cfg)
    out = ref_decode_attention(q[-1:], cache, table, torch.tensor([t]), cfg, d**-0.5)
    torch.testing.assert_close(out, dense[-1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sink", [0, 1])
@pytest.mark.parametrize("chunks", [[2 * G + 3], [G - 1, G + 4], [G, G, 3], [17, 1, 1, G]], ids=str)
def test_chunked_extend_equals_one_prefill_and_the_dense_spec(chunks, sink):
    """Prefix-cache hit == miss: each chunk reads its prefix from the cache."""
    d, hkv, group = 64, 2, 4
    cfg = _config(d, sink)
    n = sum(chunks)
    q, k, v = sequence(n, hkv * group, hkv, d, seed=len(chunks))
    k, v = fp16(k), fp16(v)
    dense = ref_decode_consistent_attention(q, k, v, cfg, d**-0.5)
    outs, pre = [], 0
    for c in chunks:
        end = pre + c
        fp16_pages = set(range(min(sink, -(-end // G))))
        if pre % G:
            fp16_pages.add(pre // G)  # the partial prefix page stays in its fp16 slot
        cache, table = build_cache([(k, v, end, fp16_pages)], cfg, seed=c)
        outs.append(
            ref_extend_attention(
                q[pre:end],
                k[pre:end],
                v[pre:end],
                cache,
                table,
                torch.tensor([pre]),
                torch.tensor([c]),
                cfg,
                d**-0.5,
            )
        )
        pre = end
    torch.testing.assert_close(torch.cat(outs), dense, atol=1e-5, rtol=1e-5)


def test_batched_extend_and_decode_match_per_request_results():
    d, cfg = 64, _config(64, 1)
    reqs, qs, pres, exts = [], [], [], []
    for b, (pre, ext) in enumerate([(0, G + 5), (G, 3), (G + 7, G)]):
        q, k, v = sequence(pre + ext, 4, 2, d, seed=10 + b)
        k, v = fp16(k), fp16(v)
        pages = {0} | ({pre // G} if pre % G else set())
        reqs.append((k, v, pre + ext, pages))
        qs.append(q)
        pres.append(pre)
        exts.append(ext)
    cache, table = build_cache(reqs, cfg)
    q_new = torch.cat([q[p:] for q, p in zip(qs, pres, strict=True)])
    k_new = torch.cat([r[0][p:] for r, p in zip(reqs, pres, strict=True)])
    v_new = torch.cat([r[1][p:] for r, p in zip(reqs, pres, strict=True)])
    out = ref_extend_attention(
        q_new, k_new, v_new, cache, table, torch.tensor(pres), torch.tensor(exts), cfg, d**-0.5
    )
    start = 0
    for b, (q, (k, v, *_)) in enumerate(zip(qs, reqs, strict=True)):
        dense = ref_decode_consistent_attention(q, k, v, cfg, d**-0.5)
        torch.testing.assert_close(
            out[start : start + exts[b]], dense[pres[b] :], atol=1e-5, rtol=1e-5
        )
        start += exts[b]


def test_decode_rejects_an_own_page_without_fp16_slot():
    d, cfg = 64, _config(64, 1)
    q, k, v = sequence(2 * G, 2, 2, d, seed=1)
    cache, table = build_cache([(k, v, 2 * G, {0})], cfg)  # own page 1 committed, no slot
    with pytest.raises(ValueError, match=r"Page \d+ must be read in fp16 but has no fp16 slot"):
        ref_decode_attention(q[-1:], cache, table, torch.tensor([2 * G]), cfg, d**-0.5)


if __name__ == "__main__":
    test_chunked_extend_equals_one_prefill_and_the_dense_spec([G - 1, G + 4], 1)
