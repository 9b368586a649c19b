"""The quantized attention path inside a transformers model (``kvarn_sglang.eval.attention``)."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import HEAD_DIM, one_thread, tiny_llama

from kvarn_sglang.eval import attention as eval_attention
from kvarn_sglang.eval.attention import (
    PassThroughMethod,
    paged_attention,
    paged_attention_mode,
    paged_logits,
)
from kvarn_sglang.quant.baselines import get_method
from kvarn_sglang.quant.page_attention import LayerAttention
from kvarn_sglang.quant.reference import decode_consistent_attention

G = 64  # page size of the tiny-model tests
_ = one_thread  # autouse fixture: tiny ops on 2 shared cores run fastest single-threaded


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, 3 * G + 17), generator=torch.Generator().manual_seed(1))


def _reference_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0]


# ------------------------------------------------------------------- paged_attention
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("length", [1, 17, 15, 16, 17 + 16, 2 * 16 + 3])
@pytest.mark.parametrize("q_start", [0, 5, 16, 21])
def test_paged_attention_matches_decode_consistent_reference(head_dim, group, length, q_start):
    g, hkv = 16, 2
    gen = torch.Generator().manual_seed(length + q_start)
    n = q_start + length
    q = torch.randn(hkv * group, length, head_dim, generator=gen)
    k_read, v_read = (torch.randn(hkv, n, head_dim, generator=gen) for _ in range(2))
    own_start = q_start // g * g
    k_own, v_own = (torch.randn(hkv, n - own_start, head_dim, generator=gen) for _ in range(2))
    scale = head_dim**-0.5
    out = paged_attention(q, q_start, k_read, v_read, k_own, v_own, own_start, g, scale)
    expected = decode_consistent_attention(
        q.transpose(0, 1),
        torch.arange(q_start, n),
        k_read.transpose(0, 1),
        v_read.transpose(0, 1),
        k_own.transpose(0, 1),
        v_own.transpose(0, 1),
        own_start,
        g,
        scale,
    ).transpose(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "attn",
    [
        LayerAttention(window_left=0),
        LayerAttention(window_left=7),
        LayerAttention(window_left=20),
        LayerAttention(softcap=2.0),
        LayerAttention(sinks=torch.tensor([-1.0, 0.5, 3.0, 0.0])),
        LayerAttention(window_left=9, softcap=3.0, sinks=torch.tensor([1.0, 0.0, -2.0, 2.0])),
    ],
    ids=["window1", "window8", "window21", "softcap", "sinks", "all"],
)
@pytest.mark.parametrize("q_start", [0, 21, 37])
def test_paged_attention_honours_windows_caps_and_sinks(attn, q_start):
    g, hkv, d, n = 16, 2, 64, 53
    gen = torch.Generator().manual_seed(q_start)
    q = torch.randn(4, n - q_start, d, generator=gen) * 2
    k_read, v_read = (torch.randn(hkv, n, d, generator=gen) for _ in range(2))
    own_start = q_start // g * g
    k_own, v_own = (torch.randn(hkv, n - own_start, d, generator=gen) for _ in range(2))
    expected = decode_consistent_attention(
        *(x.transpose(0, 1) for x in (q,)), torch.arange(q_start, n),
        k_read.transpose(0, 1), v_read.transpose(0, 1), k_own.transpose(0, 1),
        v_own.transpose(0, 1), own_start, g, 0.2, attn,
    ).transpose(0, 1)  # fmt: skip
    out = paged_attention(q, q_start, k_read, v_read, k_own, v_own, own_start, g, 0.2, attn=attn)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # pages wholly before the first query's window need not be there at all
    skip = attn.first_key(q_start) // g * g
    out = paged_attention(
        q, q_start, k_read[:, skip:], v_read[:, skip:], k_own, v_own, own_start, g, 0.2,
        attn=attn, read_start=skip,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_paged_attention_rejects_a_read_start_inside_the_window():
    q, k = torch.randn(2, 4, 64), torch.randn(2, 40, 64)
    with pytest.raises(ValueError, match="Unsupported read_start 16"):
        paged_attention(q, 36, k, k, k[:, 32:], k[:, 32:], 32, 16, 1.0, read_start=16)
    with pytest.raises(ValueError, match="Unsupported window_left -1"):
        LayerAttention(window_left=-1)
    with pytest.raises(ValueError, match=r"Invalid shape of sinks: expected \[2\]"):
        paged_attention(q, 0, k, k, k, k, 0, 16, 1.0, attn=LayerAttention(sinks=torch.ones(3)))


def test_paged_attention_reads_earlier_pages_stored_and_its_own_page_exact():
    # q = 0 makes attention uniform over the visible keys; one-hot values reveal which.
    g, t = 4, 11
    q = torch.zeros(1, t, 2 * t)
    eye = torch.eye(2 * t)
    v_read, v_own = eye[:t][None], eye[t:][None]
    k = torch.zeros(1, t, 2 * t)
    out = paged_attention(q, 0, k, v_read, k, v_own, 0, g, 1.0)[0]
    for p in range(t):
        visible_read = [s for s in range(t) if s // g < p // g]
        visible_own = [t + s for s in range(t) if s // g == p // g and s <= p]
        expected = torch.zeros(2 * t)
        expected[visible_read + visible_own] = 1.0 / (len(visible_read) + len(visible_own))
        torch.testing.assert_close(out[p], expected, msg=f"position {p}")


def test_paged_attention_rejects_bad_shapes():
    q, k = torch.randn(3, 8, 64), torch.randn(2, 8, 64)
    with pytest.raises(ValueError, match="Invalid shape of q"):
        paged_attention(q, 0, k, k, k, k, 0, 4, 1.0)
    with pytest.raises(ValueError, match="Invalid shape of q"):
        paged_attention(q[0], 0, k, k, k, k, 0, 4, 1.0)
    with pytest.raises(ValueError, match="Invalid shape of k_read"):
        paged_attention(torch.randn(4, 8, 64), 0, k[0], k[0], k, k, 0, 4, 1.0)
    q = torch.randn(4, 8, 64)
    with pytest.raises(ValueError, match="Invalid shape of k_own"):
        paged_attention(q, 0, k, k, k[:, :5], k[:, :5], 0, 4, 1.0)
    with pytest.raises(ValueError, match="Invalid shape of k_own"):
        paged_attention(q[:, :2], 6, k, k, k, k, 0, 4, 1.0)  # own page starts at 4, not 0
    with pytest.raises(ValueError, match="Invalid shape of k_read"):
        paged_attention(q, 0, k[:, :2], k[:, :2], k, k, 0, 4, 1.0)


# ------------------------------------------------------------------------ in a model
def test_passthrough_method_reproduces_the_model_logits(model, ids):
    method = PassThroughMethod(head_dim=HEAD_DIM, page_size=G)
    logits = paged_logits(model, ids, method, sink_pages=1)
    torch.testing.assert_close(logits, _reference_logits(model, ids), atol=1e-5, rtol=1e-5)
    # sink_pages=0 quantizes page 0 too: still lossless
    logits = paged_logits(model, ids, method, sink_pages=0)
    torch.testing.assert_close(logits, _reference_logits(model, ids), atol=1e-5, rtol=1e-5)


def test_reference_mode_is_the_model_itself(model, ids):
    logits = paged_logits(model, ids, None)
    torch.testing.assert_close(logits, _reference_logits(model, ids), atol=1e-6, rtol=1e-6)


def test_fp16_pages_stay_within_fp16_tolerance_and_low_bits_do_not(model, ids):
    ref = _reference_logits(model, ids)
    fp16 = paged_logits(model, ids, get_method("fp16", head_dim=HEAD_DIM, page_size=G))
    assert 0 < (fp16 - ref).abs().max() < 1e-3
    kivi2 = paged_logits(model, ids, get_method("kivi2", head_dim=HEAD_DIM, page_size=G))
    assert (kivi2 - ref).abs().max() > 1e-2
    # tokens of the sink page and of page 1 read no quantized page: identical logits
    torch.testing.assert_close(kivi2[: 2 * G], ref[: 2 * G], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["kivi2", "k2v2_g64", "hadamard4"])
def test_model_attends_to_the_method_dequantization(model, ids, name):
    method = get_method(name, head_dim=HEAD_DIM, page_size=G)
    seen = []
    paged_logits(model, ids, method, observer=lambda *args: seen.append(args))
    assert [s[0] for s in seen] == [0, 1]
    t = ids.shape[1]
    for _, q, k, v, out, scale, _attn in seen:
        # independent read view: pages 1..2 (full, past the sink) through the method
        kp = k[:, G : 3 * G].reshape(-1, 2, G, HEAD_DIM).permute(1, 2, 0, 3)  # [2, G, H, D]
        vp = v[:, G : 3 * G].reshape(-1, 2, G, HEAD_DIM).permute(1, 2, 0, 3)
        kd, vd = method.dequantize_pages(method.quantize_pages(kp, vp))  # [2, G, H, D]
        k_read, v_read = k.transpose(0, 1).clone(), v.transpose(0, 1).clone()
        k_read[G : 3 * G], v_read[G : 3 * G] = kd.flatten(0, 1), vd.flatten(0, 1)
        expected = decode_consistent_attention(
            q.transpose(0, 1),
            torch.arange(t),
            k_read,
            v_read,
            k.transpose(0, 1),
            v.transpose(0, 1),
            0,
            G,
            scale,
        )
        torch.testing.assert_close(out, expected.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_paged_attention_mode_restores_the_attention_implementation(model, ids):
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError), paged_attention_mode(model, None):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    assert eval_attention._state is None


def test_paged_attention_mode_rejects_nesting_and_negative_sinks(model):
    with (
        pytest.raises(ValueError, match="Unsupported sink_pages -1"),
        paged_attention_mode(model, None, sink_pages=-1),
    ):
        pass
    with (
        paged_attention_mode(model, None),
        pytest.raises(ValueError, match="not re-entrant"),
        paged_attention_mode(model, None),
    ):
        pass


def test_paged_logits_rejects_batches(model):
    with pytest.raises(ValueError, match=r"Invalid shape of input_ids: expected \[1, T\]"):
        paged_logits(model, torch.zeros(2, 8, dtype=torch.long), None)


def test_attention_rejects_batches_and_use_outside_the_mode(model):
    q = torch.zeros(2, 4, 8, HEAD_DIM)
    with pytest.raises(ValueError, match="only usable inside paged_attention_mode"):
        eval_attention._paged_forward(model.model.layers[0].self_attn, q, q, q, None)
    with (
        paged_attention_mode(model, None),
        pytest.raises(ValueError, match="Invalid shape of query"),
    ):
        eval_attention._paged_forward(model.model.layers[0].self_attn, q, q, q, None)


def test_quantized_full_forward_rejects_a_key_longer_than_the_query(model):
    method = get_method("int4", head_dim=HEAD_DIM, page_size=G)
    q, k = torch.zeros(1, 4, 1, HEAD_DIM), torch.zeros(1, 2, 5, HEAD_DIM)
    with (
        paged_attention_mode(model, method),
        pytest.raises(ValueError, match="Invalid shape of key"),
    ):
        eval_attention._paged_forward(model.model.layers[0].self_attn, q, k, k, None)


if __name__ == "__main__":
    test_passthrough_method_reproduces_the_model_logits(
        tiny_llama(), torch.randint(0, 256, (1, 3 * G + 17))
    )
