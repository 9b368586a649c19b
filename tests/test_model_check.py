"""The scheduler-side startup check of the attention layers SGLang built
(``kvarn_sglang.serving.model_check``), on real ``RadixAttention`` modules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.serving.backend import KVarNAttnBackend
from kvarn_sglang.serving.model_check import refuse_unsupported_layers
from kvarn_sglang.serving.pool import KVarNTokenToKVPool


def _attn(layer_id: int, **kw) -> RadixAttention:
    return RadixAttention(4, 64, 0.125, 2, layer_id=layer_id, **kw)


def _model(*layers: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.ModuleList(layers)


class SharedKVLayer(torch.nn.Module):
    """A decoder layer of Gemma 3n's shape: it reads another layer's KV cache."""

    is_kv_shared_layer = True

    def __init__(self) -> None:
        super().__init__()
        self.attn = _attn(0)


def test_decoder_layers_with_distinct_ids_are_accepted():
    refuse_unsupported_layers(_model(_attn(0), _attn(1), _attn(2)))


def test_sliding_window_layers_are_accepted():
    """The KVarN attention honours a layer's window (Gemma 3: 5 sliding layers per full one)."""
    refuse_unsupported_layers(_model(_attn(0, sliding_window_size=511), _attn(1)))


@pytest.mark.parametrize(
    "model, reason",
    [
        (_model(_attn(0), _attn(1, logit_cap=30.0)), "soft-capping"),
        (_model(_attn(0, attn_type=AttentionType.ENCODER_ONLY)), "encoder_only attention"),
        (_model(_attn(0, attn_type=AttentionType.DECODER_BIDIRECTIONAL)), "bidirectional"),
        (_model(_attn(0, is_cross_attention=True)), "cross-attention"),
        (_model(_attn(0, use_irope=True)), "chunked local attention"),
        (_model(_attn(0), _attn(1), _attn(1)), "KV shared across layers"),
        (_model(_attn(1), SharedKVLayer()), "KV shared across layers"),
    ],
    ids=["softcap", "encoder_only", "bidirectional", "cross", "irope", "same_id", "shared_layer"],
)  # fmt: skip
def test_refuse_unsupported_layers_rejects_what_kvarn_attention_does_not_implement(model, reason):
    with pytest.raises(ValueError, match=reason) as refused:
        refuse_unsupported_layers(model)
    assert "--kv-cache kvarn" in str(refused.value) and "\n" not in str(refused.value)


def test_backend_rejects_a_model_with_soft_capping_at_startup():
    cfg = KVarNConfig(k_bits=4, v_bits=2, page_size=64, head_dim=64, sink_pages=1)
    pool = KVarNTokenToKVPool(
        128, 64, torch.float16, 2, 64, 1, "cpu", False, start_layer=0, end_layer=1,
        kvarn_config=cfg, num_slots=2,
    )  # fmt: skip
    runner = SimpleNamespace(
        token_to_kv_pool=pool,
        req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(2, 128, dtype=torch.int32)),
        model=_model(_attn(0, logit_cap=50.0)),
    )
    with pytest.raises(ValueError, match="soft-capping"):
        KVarNAttnBackend(runner)
    runner.model = _model(_attn(0))
    assert KVarNAttnBackend(runner).pool is pool


if __name__ == "__main__":
    test_backend_rejects_a_model_with_soft_capping_at_startup()
