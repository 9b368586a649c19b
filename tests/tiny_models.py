"""Tiny randomly initialised transformers models of the attention families KVarN serves
beyond plain causal attention: Gemma 3 (sliding windows beside full layers), Gemma 2 (windows
and logit soft-capping) and gpt-oss (windows and learned attention sinks).

Each has head_dim 64, 4 query heads over 2 KV heads, a window of ``WINDOW`` tokens on its
sliding layers and larger-than-default Q/K projections (attention far from uniform, so that a
window that is ignored changes the logits). Built in memory, nothing downloaded.
"""

from __future__ import annotations

import torch

WINDOW = 40  # Hugging Face's sliding_window: a query reads itself and the 39 keys before it
_COMMON = dict(
    vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
)  # fmt: skip


def _sharpen(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
                module.q_proj.weight.mul_(4.0)
                module.k_proj.weight.mul_(4.0)
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.copy_(torch.randn(module.sinks.shape, generator=gen) * 2)
    return model.eval()


def tiny_gemma3(seed: int = 0):
    """``Gemma3ForCausalLM``: layer 0 sliding (window ``WINDOW``), layer 1 full."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        **_COMMON, num_hidden_layers=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=64,
    )  # fmt: skip
    return _sharpen(Gemma3ForCausalLM(config), seed)


def tiny_gemma2(seed: int = 0):
    """``Gemma2ForCausalLM``: windows on even layers, soft-capping 5 on all."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(
        **_COMMON, num_hidden_layers=2, sliding_window=WINDOW, attn_logit_softcapping=5.0,
        query_pre_attn_scalar=64,
    )  # fmt: skip
    return _sharpen(Gemma2ForCausalLM(config), seed)


def tiny_gpt_oss(seed: int = 0):
    """``GptOssForCausalLM``: windows on even layers, learned sinks on all, 2 experts."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(
        **_COMMON, num_hidden_layers=2, sliding_window=WINDOW, num_local_experts=2,
        num_experts_per_tok=1,
    )  # fmt: skip
    return _sharpen(GptOssForCausalLM(config), seed)


FAMILIES = {"gemma3": tiny_gemma3, "gemma2": tiny_gemma2, "gpt_oss": tiny_gpt_oss}
