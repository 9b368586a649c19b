"""Capture the post-RoPE queries, keys and values a transformers model attends with.

A custom attention function is registered with transformers' ``AttentionInterface``; while
``capture_qkv`` runs, it records each layer's Q, K, V and then computes ordinary SDPA, so the
model's output is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NAME = "kvarn_capture"
_records: list | None = None


@dataclass
class LayerQKV:
    """One layer's attention inputs for one sequence.

    Attributes:
        q: ``fp32 [T, Hq, D]``; k, v: ``fp32 [T, Hkv, D]`` (K after RoPE); scale: softmax scale.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float


def _capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _records is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        q, k, v = (x[0].transpose(0, 1).float().clone() for x in (query, key, value))
        _records.append(LayerQKV(q, k, v, float(scale)))
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, **kwargs
    )


def capture_qkv(model, input_ids: torch.Tensor) -> list[LayerQKV]:
    """Run ``model`` on ``input_ids`` ``[1, T]`` and return every layer's ``LayerQKV``."""
    global _records
    from transformers import AttentionInterface

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"Invalid shape of input_ids: expected [1, T], got {list(input_ids.shape)}"
        )
    AttentionInterface.register(_NAME, _capture_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_NAME)
    _records = []
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
        return _records
    finally:
        _records = None
        model.set_attn_implementation(previous)
