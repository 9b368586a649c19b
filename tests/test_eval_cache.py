"""The incremental quantized cache and greedy generation (``kvarn_sglang.eval.cache``)."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import HEAD_DIM, one_thread, tiny_llama

from kvarn_sglang.eval.attention import PassThroughMethod, paged_attention_mode, paged_logits
from kvarn_sglang.eval.cache import PagedQuantizedCache, PagedQuantizedLayer, greedy_generate
from kvarn_sglang.eval.metrics import first_divergence
from kvarn_sglang.eval.quant_error import dequantized_read
from kvarn_sglang.quant.baselines import get_method
from kvarn_sglang.quant.reference import decode_consistent_attention

G = 64
T = 3 * G + 9
_ = one_thread  # autouse fixture: tiny ops on 2 shared cores run fastest single-threaded


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(2))


class CountingMethod:
    """Wraps a method and records every K page it is asked to quantize."""

    def __init__(self, method):
        self.inner, self.calls = method, []
        self.page_size, self.name = method.page_size, method.name

    def quantize_pages(self, k, v):
        self.calls.append(k.clone())
        return self.inner.quantize_pages(k, v)

    def dequantize_pages(self, records):
        return self.inner.dequantize_pages(records)


def _incremental_logits(model, ids, method, chunks, sink_pages=1, observer=None):
    cache = PagedQuantizedCache(model.config.num_hidden_layers, method, sink_pages)
    out, start = [], 0
    mode = paged_attention_mode(
        model, method, sink_pages=sink_pages, cache=cache, observer=observer
    )
    with mode, torch.no_grad():
        for n in chunks:
            step = ids[:, start : start + n]
            out.append(model(input_ids=step, past_key_values=cache, use_cache=True).logits[0])
            start += n
    assert start == ids.shape[1]
    return torch.cat(out), cache


CHUNKINGS = {
    "token by token": [1] * T,
    "prefill + decode": [G + 5] + [1] * (T - G - 5),
    "uneven chunks": [7, 60, 1, 70, 3, T - 141],
    "one prefill": [T],
}


def _method(name):
    if name == "passthrough":
        return PassThroughMethod(head_dim=HEAD_DIM, page_size=G)
    return get_method(name, head_dim=HEAD_DIM, page_size=G)


@pytest.mark.parametrize("chunks", list(CHUNKINGS.values()), ids=list(CHUNKINGS))
@pytest.mark.parametrize("name", ["passthrough", "int4", "kivi2", "k2v2_g64"])
def test_incremental_attention_is_decode_consistent(model, ids, name, chunks):
    # What every layer computed while decoding incrementally must equal the spec applied to
    # the same Q/K/V (full pages past the sink through the method, own page exact).
    method, steps = _method(name), {0: [], 1: []}
    _incremental_logits(
        model, ids, method, chunks, observer=lambda layer, *a: steps[layer].append(a)
    )
    for layer in (0, 1):
        q, k, v, out = (torch.cat([s[i] for s in steps[layer]], 1) for i in range(4))
        k_read, v_read, _ = dequantized_read(method, k.transpose(0, 1), v.transpose(0, 1), 1)
        expected = decode_consistent_attention(
            q.transpose(0, 1),
            torch.arange(T),
            k_read,
            v_read,
            k.transpose(0, 1),
            v.transpose(0, 1),
            0,
            G,
            steps[layer][0][4],
        )
        torch.testing.assert_close(out, expected.transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", list(CHUNKINGS.values()), ids=list(CHUNKINGS))
@pytest.mark.parametrize(("name", "atol"), [("passthrough", 2e-5), ("kivi2", 1e-3)])
def test_incremental_logits_equal_the_single_forward(model, ids, name, chunks, atol):
    # Both paths compute K/V in a different float order, so with a quantizer a code can
    # round the other way (logits move ~1e-4); a semantic error moves them > 1e-2.
    method = _method(name)
    full = paged_logits(model, ids, method)
    inc, cache = _incremental_logits(model, ids, method, chunks)
    torch.testing.assert_close(inc, full, atol=atol, rtol=0)
    assert [layer.committed_pages for layer in cache.layers] == [2, 2]  # pages 1, 2
    if name == "kivi2":
        ref = paged_logits(model, ids, None)
        assert (full - ref).abs().max() > 10 * atol


def test_each_page_is_quantized_once_from_its_exact_values(model, ids):
    method = CountingMethod(get_method("kivi2", head_dim=HEAD_DIM, page_size=G))
    exact = {0: [], 1: []}
    _, cache = _incremental_logits(
        model,
        ids,
        method,
        [1] * T,
        observer=lambda layer, q, k, v, o, *_: exact[layer].append((k, v)),
    )
    # 2 layers x pages 1, 2; each call one page, made when its last token arrives
    assert len(method.calls) == 4 and all(c.shape[0] == 1 for c in method.calls)
    k0 = torch.cat([k for k, _ in exact[0]], 1)  # layer 0's exact K, V [H, T, D]
    v0 = torch.cat([v for _, v in exact[0]], 1)
    torch.testing.assert_close(method.calls[0][0].transpose(0, 1), k0[:, G : 2 * G])
    pages = [x[:, G : 3 * G].reshape(-1, 2, G, HEAD_DIM).permute(1, 2, 0, 3) for x in (k0, v0)]
    assert torch.equal(torch.cat(cache.layers[0].records), method.inner.quantize_pages(*pages))


def test_sink_page_stays_exact_and_later_pages_read_dequantized(model, ids):
    method = get_method("int4", head_dim=HEAD_DIM, page_size=G)
    exact = []
    _, cache = _incremental_logits(
        model, ids, method, [T], observer=lambda layer, q, k, v, o, *_: exact.append(k)
    )
    layer, k = cache.layers[0], exact[0]
    assert layer.read_k.shape[2] == 3 * G and layer.tail_k.shape[2] == T - 3 * G
    assert torch.equal(layer.read_k[0, :, :G], k[:, :G])  # sink page
    kd, _ = method.dequantize_pages(torch.cat(layer.records))
    torch.testing.assert_close(layer.read_k[0, :, G:], kd.permute(2, 0, 1, 3).flatten(1, 2))
    assert not torch.allclose(layer.read_k[0, :, G:], k[:, G : 3 * G], atol=1e-3)
    assert torch.equal(layer.tail_k[0], k[:, 3 * G :])  # unfinished page: exact
    # sink_pages=0: page 0 is quantized too
    _, cache0 = _incremental_logits(model, ids, method, [T], sink_pages=0)
    assert cache0.layers[0].committed_pages == 3


def test_greedy_generation_with_passthrough_equals_the_reference(model):
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    ref = greedy_generate(model, prompt, 2 * G, None)
    ours = greedy_generate(model, prompt, 2 * G, PassThroughMethod(head_dim=HEAD_DIM, page_size=G))
    assert torch.equal(ours, ref)


def test_incremental_greedy_diverges_where_the_teacher_forced_argmax_does(model):
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    n = 3 * G
    ref = greedy_generate(model, prompt, n, None)
    method = get_method("kivi2", head_dim=HEAD_DIM, page_size=G)
    ours = greedy_generate(model, prompt, n, method)
    logits = paged_logits(model, torch.cat([prompt, ref[None, :-1]], 1), method)
    forced = logits[prompt.shape[1] - 1 :].argmax(-1)
    d = first_divergence(ours, ref)
    assert d == first_divergence(forced, ref)
    assert d >= 2 * G - prompt.shape[1]  # nothing is read quantized before position 2G
    if d < n:
        assert ours[d] == forced[d]  # the first diverging token is the same too


def test_cache_rejects_batches_and_negative_sinks():
    method = get_method("int4", head_dim=HEAD_DIM, page_size=G)
    with pytest.raises(ValueError, match="Unsupported sink_pages -1"):
        PagedQuantizedCache(2, method, sink_pages=-1)
    with pytest.raises(ValueError, match=r"Invalid shape of key_states: expected \[1,"):
        PagedQuantizedLayer(method, 1).update(
            torch.zeros(2, 2, 3, HEAD_DIM), torch.zeros(2, 2, 3, HEAD_DIM)
        )


def test_greedy_generate_rejects_batched_prompts(model):
    with pytest.raises(ValueError, match=r"Invalid shape of prompt_ids: expected \[1, P\]"):
        greedy_generate(model, torch.zeros(2, 4, dtype=torch.long), 3, None)


if __name__ == "__main__":
    m, x = tiny_llama(), torch.randint(0, 256, (1, T))
    test_incremental_logits_equal_the_single_forward(
        m, x, "kivi2", CHUNKINGS["uneven chunks"], 1e-3
    )
