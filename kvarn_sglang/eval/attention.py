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
With ``method=None`` attention is exact (the reference).

Each layer's attention variant comes from the arguments transformers passes to the attention
function (``layer_attention``): a sliding window (``sliding_window``, Gemma 2/3, gpt-oss,
Mistral), logit soft-capping (``softcap``, Gemma 2) and learned attention sinks (``s_aux``,
gpt-oss) are honoured in every path (reference, quantized, cached); anything else that would
change the result (a bidirectional or custom mask, a position bias, an argument not known
here) raises ``ValueError`` naming it. A custom attention function gets no mask from
transformers, so nothing may be left to one: ``check_reference`` compares the reference with
the model's own forward (transformers' ``sdpa``, or ``eager`` for soft-capping and sinks).

An optional ``observer(layer_idx, q, k, v, out, sm_scale, attn)`` sees each layer's post-RoPE
``q [Hq, T, D]``, ``k, v [Hkv, T, D]`` (the new tokens, unquantized), the attention output
``out [Hq, T, D]`` before ``o_proj``, the softmax scale and the layer's ``LayerAttention``.
Batch size 1 only (one sequence, no padding). Device-agnostic torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from kvarn_sglang.eval.quant_error import dequantized_read
from kvarn_sglang.format.layout import PageLayout
from kvarn_sglang.quant.baselines import PageMethod
from kvarn_sglang.quant.page_attention import LayerAttention, paged_attention

NAME = "kvarn_paged"
Observer = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, LayerAttention], None
]
# Arguments transformers passes to attention functions that do not change the result.
_NEUTRAL_KWARGS = {
    "dropout", "position_ids", "use_cache", "output_router_logits", "cache_position",
    "output_attentions", "past_key_values", "position_embeddings",
}  # fmt: skip
UNSUPPORTED = "kvarn-sglang eval does not implement"
EXACT_CHUNK = 128  # queries per attention call of the exact path with a window/cap/sinks


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


def layer_attention(module, attention_mask, kwargs: dict) -> LayerAttention:
    """The attention variant of one transformers attention call (see the module docstring);
    raises ``ValueError`` naming anything the eval does not implement."""
    name = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
    if attention_mask is not None:
        raise ValueError(f"{UNSUPPORTED} a custom attention mask, as {name} uses")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError(f"{UNSUPPORTED} non-causal (bidirectional) attention, as {name} uses")
    if kwargs.get("dropout") or kwargs.get("output_attentions"):
        raise ValueError(f"{UNSUPPORTED} attention dropout or attention weights ({name})")
    handled = {"sliding_window", "softcap", "s_aux", "is_causal", "scaling"}
    unknown = sorted(
        k for k, v in kwargs.items() if v is not None and k not in handled | _NEUTRAL_KWARGS
    )
    if unknown:
        raise ValueError(f"{UNSUPPORTED} the attention argument(s) {unknown} of {name}")
    window = kwargs.get("sliding_window")
    sinks = kwargs.get("s_aux")
    return LayerAttention(
        window_left=None if window is None else int(window) - 1,
        softcap=float(kwargs["softcap"]) if kwargs.get("softcap") else None,
        sinks=None if sinks is None else sinks.detach().float(),
    )


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attn):
    """Unquantized causal attention of one sequence from position 0 with ``attn``'s window,
    soft-capping and sinks: ``q [Hq, T, D]``, ``k, v [Hkv, T, D]`` -> ``fp32 [Hq, T, D]``."""
    if attn.is_plain:
        group = q.shape[0] // k.shape[0]
        k, v = (x.float().repeat_interleave(group, 0) for x in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(
            q.float(), k, v, is_causal=True, scale=scale
        )
    return paged_attention(q, 0, k, v, k, v, 0, EXACT_CHUNK, scale, attn=attn)


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
        layer_attention: each layer's ``LayerAttention`` as the forward found it.
    """

    method: PageMethod | None
    sink_pages: int = 1
    cache: Any = None
    observer: Observer | None = None
    layer_attention: dict[int, LayerAttention] = field(default_factory=dict)


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
    attn = layer_attention(module, attention_mask, kwargs)
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
            q, q_start, k_read, v_read, k_new, v_new, layer.own_start, layer.page_size, scale,
            attn=attn,
        )  # fmt: skip
        k_new, v_new = k_new[:, q_start - layer.own_start :], v_new[:, q_start - layer.own_start :]
    elif method is None:
        if k.shape[1] != q.shape[1]:
            raise ValueError(
                f"Invalid shape of key: expected [1, {k.shape[0]}, {q.shape[1]}, {q.shape[2]}] "
                f"(a full forward from position 0 without a cache), got {list(key.shape)}"
            )
        out, k_new, v_new = exact_attention(q, k, v, scale, attn), k, v
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
            q, 0, k_read, v_read, k, v, 0, method.page_size, scale, recent_pages_of(method),
            attn=attn,
        )  # fmt: skip
        k_new, v_new = k, v
    _state.layer_attention[layer_idx] = attn
    if _state.observer is not None:
        _state.observer(layer_idx, q, k_new, v_new, out, float(scale), attn)
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


def _native_logits(model, input_ids: torch.Tensor, implementation: str) -> torch.Tensor:
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, use_cache=False).logits[0].float()
    finally:
        model.set_attn_implementation(previous)


@dataclass(frozen=True)
class ReferenceCheck:
    """``check_reference``'s finding: the largest logit difference between the eval's
    reference and the model's own forward over ``tokens`` tokens, the allowed ``tolerance``,
    the transformers attention ``implementation`` compared with and each layer's attention."""

    max_abs_diff: float
    tolerance: float
    tokens: int
    implementation: str
    layers: dict[int, LayerAttention]

    def describe(self) -> str:
        kinds = {}
        for layer, a in sorted(self.layers.items()):
            parts = [f"window {a.window_left + 1}" if a.window_left is not None else "full"]
            parts += [f"softcap {a.softcap:g}"] if a.softcap else []
            parts += ["sinks"] if a.sinks is not None else []
            kinds.setdefault(", ".join(parts), []).append(layer)
        return "; ".join(f"{k}: {len(v)} layer(s)" for k, v in kinds.items())


def check_reference(model, input_ids: torch.Tensor, *, tolerance: float | None = None):
    """Check that the eval's unquantized reference is the model's own forward.

    Runs ``input_ids`` ``[1, T]`` (the first chunk of the text) through the eval's exact
    attention and through transformers' own attention (``sdpa``; ``eager`` where a layer
    soft-caps or has sinks, which transformers' SDPA path does not implement) and raises
    ``ValueError`` when the logits differ by more than ``tolerance`` (default: 1e-3 of the
    largest logit in fp32, 5e-2 in half precision). Returns a ``ReferenceCheck``.
    """
    with paged_attention_mode(model, None) as state, torch.no_grad():
        ours = model(input_ids=input_ids, use_cache=False).logits[0].float()
        layers = dict(state.layer_attention)
    special = any(a.softcap or a.sinks is not None for a in layers.values())
    implementation = "eager" if special else "sdpa"
    try:
        native = _native_logits(model, input_ids, implementation)
    except ValueError:  # the model does not support SDPA
        implementation = "eager"
        native = _native_logits(model, input_ids, implementation)
    if tolerance is None:
        rel = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
        tolerance = rel * max(1.0, float(native.abs().max()))
    diff = float((ours - native).abs().max())
    check = ReferenceCheck(diff, tolerance, int(input_ids.shape[1]), implementation, layers)
    if not diff <= tolerance:
        raise ValueError(
            f"kvarn-sglang eval refuses this model: its unquantized reference differs from the "
            f"model's own forward (transformers {implementation!r} attention) by max |d logit| "
            f"{diff:.4g} > {tolerance:.3g} on the first {check.tokens} tokens, so every number "
            f"would be for a different model. The model's attention uses a feature the eval "
            f"does not implement (it implements causal attention with sliding windows, logit "
            f"soft-capping and learned sinks; found: {check.describe()})"
        )
    return check
