"""``kvarn-sglang eval`` computes the user's model or refuses it: sliding windows, logit
soft-capping and learned attention sinks honoured in the reference, every method's path and
the incremental cache, and a start-of-run check against transformers' own forward."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import one_thread, tiny_llama
from tiny_models import FAMILIES, WINDOW

import kvarn_sglang.eval.attention as eval_attention
from kvarn_sglang.eval.attention import (
    PassThroughMethod,
    check_reference,
    layer_attention,
    paged_logits,
)
from kvarn_sglang.eval.cache import greedy_generate
from kvarn_sglang.eval.run import EvalSettings, run_eval
from kvarn_sglang.quant.baselines import get_method
from kvarn_sglang.quant.page_attention import LayerAttention

G = 32
_ = one_thread


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, 4 * G + 9), generator=torch.Generator().manual_seed(3))


def _native(model, ids, implementation="eager"):
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits[0].float()
    finally:
        model.set_attn_implementation(previous)


def test_reference_and_lossless_pages_are_the_models_own_forward(family, ids):
    name, model = family
    check = check_reference(model, ids)
    assert check.max_abs_diff <= check.tolerance, name
    expected = {"gemma3": "window 40: 1", "gemma2": "window 40, softcap 5: 1",
                "gpt_oss": "window 40, sinks: 1"}[name]  # fmt: skip
    assert expected in check.describe()
    eager = _native(model, ids)
    torch.testing.assert_close(paged_logits(model, ids, None), eager, atol=1e-4, rtol=1e-4)
    lossless = paged_logits(model, ids, PassThroughMethod(head_dim=64, page_size=G))
    torch.testing.assert_close(lossless, eager, atol=1e-4, rtol=1e-4)


def test_quantized_cache_decodes_what_the_full_forward_computes(family, ids):
    """Incremental decoding with a quantized cache honours windows, caps and sinks as the
    teacher-forced forward does (the eval's ``forced`` and ``incremental`` modes agree)."""
    name, model = family
    method = get_method("k4v2_g64", head_dim=64, page_size=64)
    prompt, n = ids[:, : 2 * 64 - 3], 8
    ours = greedy_generate(model, prompt, n, method)
    seq = torch.cat([prompt, ours[None, :-1]], 1)
    forced = paged_logits(model, seq, method)[prompt.shape[1] - 1 :].argmax(-1)
    assert torch.equal(ours, forced), name


def test_an_ignored_window_is_refused_not_measured(monkeypatch, ids):
    """The bug this guards against: the eval used to attend past Gemma 3's windows and
    report numbers for a model nobody has."""
    model = FAMILIES["gemma3"]()
    monkeypatch.setattr(eval_attention, "layer_attention", lambda *a: LayerAttention())
    with pytest.raises(ValueError, match="differs from the model's own forward") as err:
        check_reference(model, ids)
    assert "full: 2 layer(s)" in str(err.value)


def test_layer_attention_reads_windows_caps_and_sinks_and_rejects_the_rest():
    model = tiny_llama()
    module = model.model.layers[0].self_attn
    sinks = torch.ones(4)
    attn = layer_attention(module, None, {"sliding_window": WINDOW, "softcap": 30.0,
                                          "s_aux": sinks, "position_ids": None})  # fmt: skip
    assert attn.window_left == WINDOW - 1 and attn.softcap == 30.0
    assert torch.equal(attn.sinks, sinks)
    assert layer_attention(module, None, {"dropout": 0.0, "use_cache": False}).is_plain
    with pytest.raises(ValueError, match="custom attention mask"):
        layer_attention(module, torch.ones(1, 1, 4, 4, dtype=torch.bool), {})
    with pytest.raises(ValueError, match="non-causal"):
        layer_attention(module, None, {"is_causal": False})
    with pytest.raises(ValueError, match=r"attention argument\(s\) \['position_bias'\]"):
        layer_attention(module, None, {"position_bias": torch.zeros(1)})


def test_run_eval_records_the_reference_check_on_a_sliding_window_model(ids):
    model = FAMILIES["gemma3"]()
    settings = EvalSettings(methods=["k4v2_g64"], page_size=64, gen_tokens=4)
    long_ids = torch.randint(0, 256, (1, 3 * 64 + 5), generator=torch.Generator().manual_seed(4))
    result = run_eval(model, long_ids, [long_ids[:, :70]], settings, progress=False)
    check = result.reference_check
    assert check["implementation"] == "sdpa" and check["max_abs_logit_diff"] <= check["tolerance"]
    ref = _native(model, long_ids, "sdpa")
    logp = torch.log_softmax(ref[:-1], -1).gather(1, long_ids[0, 1:, None])[:, 0]
    expected_ppl = float(torch.exp(-logp[result.scored_from :].mean()))
    assert abs(result.reference_ppl - expected_ppl) < 1e-3 * expected_ppl
    assert result.rows[0].kl > 0


if __name__ == "__main__":
    test_an_ignored_window_is_refused_not_measured(
        pytest.MonkeyPatch(), torch.randint(0, 256, (1, 137))
    )
