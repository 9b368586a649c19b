"""Capture the post-RoPE queries, keys and values a transformers model attends with.

``capture_qkv`` runs one forward of the eval's exact attention
(``kvarn_sglang.eval.attention.paged_attention_mode`` without a method: sliding windows,
soft-capping and sinks honoured, anything else refused) and records each layer's Q, K, V,
softmax scale and attention variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvarn_sglang.quant.page_attention import FULL, LayerAttention


@dataclass
class LayerQKV:
    """One layer's attention inputs for one sequence.

    Attributes:
        q: ``fp32 [T, Hq, D]``; k, v: ``fp32 [T, Hkv, D]`` (K after RoPE); scale: softmax scale;
        attn: the layer's window, soft-capping and sinks.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    attn: LayerAttention = FULL


def capture_qkv(model, input_ids: torch.Tensor) -> list[LayerQKV]:
    """Run ``model`` on ``input_ids`` ``[1, T]`` and return every layer's ``LayerQKV``."""
    from kvarn_sglang.eval.attention import paged_logits  # attention imports quant_error

    records: list[LayerQKV] = []

    def record(layer, q, k, v, out, scale, attn) -> None:
        q, k, v = (x.transpose(0, 1).float().clone() for x in (q, k, v))
        records.append(LayerQKV(q, k, v, float(scale), attn))

    paged_logits(model, input_ids, None, observer=record)
    return records
