"""Decode-consistent quantized attention inside a Hugging Face transformers model.

``paged_attention_mode(model, method)`` registers an attention function with transformers'
``AttentionInterface`` and switches the model to it. In every layer it stores K/V with our page
semantics (``kvarn_sglang.quant.reference.decode_consistent_attention`` is the spec):

* full pages past the ``sink_pages`` first pages are quantized and dequantized by ``method``
  (any ``PageMethod``: KVarN presets, ablations, baselines);
* the sink pages and the query's own page are read unquantized (the model's K/V dtype);
* a token at position p reads every page before its own page as stored and its own page's
  tokens up to p unquantized, exactly as if the sequence had been decoded token by token.

Without a cache, one forward of a whole sequence therefore computes what token-by-token
decoding with a quantized cache computes, error propagation through layers and time included
(later layers' inputs already come from quantized attention). With a
``kvarn_sglang.eval.cache.PagedQuantizedCache`` the same function serves incremental decoding.
With ``method=None`` the model's own SDPA runs unchanged (the reference).

An optional ``observer(layer_idx, q, k, v, out, sm_scale)`` sees each layer's post-RoPE
``q [Hq, T, D]``, ``k, v [Hkv, T, D]`` (the new tokens, unquantized), the attention output
``out [Hq, T, D]`` before ``o_proj`` and the softmax scale. Batch size 1 only (one sequence,
no padding). Device-agnostic torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from kvarn_sglang.eval.quant_error import dequantized_read
from kvarn_sglang.format.layout import PageLayout
from kvarn_sglang.quant.baselines import PageMethod
from kvarn_sglang.quant.page_attention import paged_attention

NAME = "kvarn_paged"
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


class PassThroughMethod(PageMethod):
    """A lossless page "quantizer": K and V stored as fp32 bytes. It runs the whole page
    machinery (commit, records, read-back) with nothing rounded, so a model must reproduce
    its own logits through it."""

    def __init__(self, *, head_dim: int, page_size: int) -> None:
        self.name, self.k_bits, self.v_bits = "passthrough", 32, 32
        self.page_size, self.head_dim = page_size, head_dim

    @cached_property
    def layout(self) -> PageLayout:
        shape = (self.page_size, self.head_dim)
        return PageLayout.build([("k", torch.float32, shape), ("v", torch.float32, shape)], *shape)

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = (x.float().permute(0, 2, 1, 3) for x in (k, v))  # [P, H, G, D]
        return self.layout.pack({"k": k, "v": v})

    def _dequantize(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.layout.unpack(records)
        return parts["k"].permute(0, 2, 1, 3).float(), parts["v"].permute(0, 2, 1, 3).float()


def layer_method(method, layer: int):
    """The method storing layer ``layer``: ``method.for_layer(layer)`` for a ``PageMethod``;
    any other object with ``quantize_pages``/``dequantize_pages`` is used as is."""
    return method.for_layer(layer) if isinstance(method, PageMethod) else method


def recent_pages_of(method) -> int:
    """Pages before a query's own page that ``method`` reads unquantized (0 unless set)."""
    return method.recent_pages if isinstance(method, PageMethod) else 0


@dataclass
class PagedAttentionState:
    """What the registered attention function does while ``paged_attention_mode`` is active.

    Attributes:
        method: the page quantizer, or None for the model's own attention (the reference).
        sink_pages: leading pages read unquantized.
        cache: a ``PagedQuantizedCache`` for incremental decoding, or None for one full forward.
        observer: called with every layer's inputs and output (see the module docstring).
    """

    method: PageMethod | None
    sink_pages: int = 1
    cache: Any = None
    observer: Observer | None = None


_state: PagedAttentionState | None = None


def _single_sequence(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(
            f"Invalid shape of {name}: expected [1, num_heads, T, head_dim] (one sequence), "
            f"got {list(x.shape)}"
        )
    return x[0]


def _paged_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The function registered as ``NAME``; returns ``(out [1, T, Hq, D], None)``."""
    if _state is None:
        raise ValueError(f"Attention {NAME!r} is only usable inside paged_attention_mode(...)")
    q, k, v = (
        _single_sequence(n, x) for n, x in (("query", query), ("key", key), ("value", value))
    )
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    method, layer_idx = _state.method, module.layer_idx
    method = layer_method(method, layer_idx)
    if _state.cache is not None:
        if recent_pages_of(method):
            raise ValueError(
                f"Unsupported recent_pages {recent_pages_of(method)} with a cache: a recent "
                f"window is only evaluated in one full forward"
            )
        layer = _state.cache.layers[layer_idx]
        n = layer.read_len
        k_read, v_read, k_new, v_new = k[:, :n], v[:, :n], k[:, n:], v[:, n:]
        q_start = layer.get_seq_length() - q.shape[1]
        out = paged_attention(
            q, q_start, k_read, v_read, k_new, v_new, layer.own_start, layer.page_size, scale
        )
        k_new, v_new = k_new[:, q_start - layer.own_start :], v_new[:, q_start - layer.own_start :]
    elif method is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )
        out, k_new, v_new = out[0].transpose(0, 1), k, v
    else:
        if k.shape[1] != q.shape[1]:
            raise ValueError(
                f"Invalid shape of key: expected [1, {k.shape[0]}, {q.shape[1]}, {q.shape[2]}] "
                f"(a full forward from position 0 without a cache), got {list(key.shape)}"
            )
        k_read, v_read, _ = dequantized_read(
            method, k.transpose(0, 1), v.transpose(0, 1), _state.sink_pages
        )
        k_read, v_read = k_read.transpose(0, 1), v_read.transpose(0, 1)
        out = paged_attention(
            q, 0, k_read, v_read, k, v, 0, method.page_size, scale, recent_pages_of(method)
        )
        k_new, v_new = k, v
    if _state.observer is not None:
        _state.observer(layer_idx, q, k_new, v_new, out, float(scale))
    return out.to(query.dtype).transpose(0, 1).unsqueeze(0), None


@contextmanager
def paged_attention_mode(
    model,
    method: PageMethod | None,
    *,
    sink_pages: int = 1,
    cache: Any = None,
    observer: Observer | None = None,
) -> Iterator[PagedAttentionState]:
    """Run ``model`` with decode-consistent quantized attention inside the ``with`` block.

    The model's attention implementation is restored on exit. Not re-entrant.
    """
    global _state
    from transformers import AttentionInterface

    if sink_pages < 0:
        raise ValueError(f"Unsupported sink_pages {sink_pages}: expected >= 0")
    if _state is not None:
        raise ValueError("paged_attention_mode is already active (it is not re-entrant)")
    AttentionInterface.register(NAME, _paged_forward)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    _state = PagedAttentionState(method, sink_pages, cache, observer)
    try:
        yield _state
    finally:
        _state = None
        model.set_attn_implementation(previous)


def paged_logits(
    model,
    input_ids: torch.Tensor,
    method: PageMethod | None,
    *,
    sink_pages: int = 1,
    observer: Observer | None = None,
) -> torch.Tensor:
    """Logits ``fp32 [T, vocab]`` of one teacher-forced forward of ``input_ids`` ``[1, T]``."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"Invalid shape of input_ids: expected [1, T], got {list(input_ids.shape)}"
        )
    with (
        paged_attention_mode(model, method, sink_pages=sink_pages, observer=observer),
        torch.no_grad(),
    ):
        return model(input_ids=input_ids, use_cache=False).logits[0].float()
