"""An incremental quantized KV cache for transformers models, and greedy generation with it.

``PagedQuantizedCache`` is a transformers ``Cache`` whose layers keep, per sequence:

* ``records``: packed ``uint8 [P, Hkv, page_bytes]`` of the committed pages past the sink,
  created once by ``method.quantize_pages`` when a page fills (never re-quantized);
* the sink pages and the unfinished page (the "tail") unquantized, in the model's K/V dtype.

For attention, ``update`` returns one tensor per K and V, ``[1, Hkv, read_len + M, D]``: the
first ``read_len`` positions are what later pages read (sinks as stored, committed pages
dequantized; decoded once at commit and kept, so nothing is decoded twice), the last M are the
unquantized tokens from the start of the first new token's page (``own_start``) to the last.
The attention function of ``kvarn_sglang.eval.attention`` splits them with ``read_len``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvarn_sglang.eval.attention import paged_attention_mode
from kvarn_sglang.quant.baselines import PageMethod


class PagedQuantizedLayer(CacheLayerMixin):
    """One layer's paged store (see the module docstring). Batch size 1."""

    is_sliding = False
    is_compileable = False

    def __init__(self, method: PageMethod, sink_pages: int) -> None:
        super().__init__()
        self.method, self.sink_pages, self.page_size = method, sink_pages, method.page_size
        self.records: list[torch.Tensor] = []
        self.seen, self.read_len, self.own_start = 0, 0, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, h, _, d = key_states.shape
        self.read_k = key_states.new_zeros(1, h, 0, d, dtype=torch.float32)
        self.read_v = self.read_k.clone()
        self.tail_k, self.tail_v = key_states[:, :, :0], value_states[:, :, :0]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new K, V ``[1, Hkv, T, D]``; commit pages that became full."""
        if key_states.dim() != 4 or key_states.shape[0] != 1:
            raise ValueError(
                f"Invalid shape of key_states: expected [1, num_kv_heads, T, head_dim], "
                f"got {list(key_states.shape)}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        g = self.page_size
        self.own_start = self.seen // g * g
        own_k = torch.cat([self.tail_k, key_states], 2)
        own_v = torch.cat([self.tail_v, value_states], 2)
        self.seen += key_states.shape[2]
        full = self.seen // g
        self._commit(own_k, own_v, first_page=self.own_start // g, last_page=full)
        self.tail_k = own_k[:, :, full * g - self.own_start :]
        self.tail_v = own_v[:, :, full * g - self.own_start :]
        self.read_len = self.read_k.shape[2]
        k = torch.cat([self.read_k, own_k.float()], 2)
        v = torch.cat([self.read_v, own_v.float()], 2)
        return k, v

    def _commit(self, own_k: torch.Tensor, own_v: torch.Tensor, first_page: int, last_page: int):
        """Move pages ``first_page .. last_page-1`` (full, from ``own_k``) into the read view."""
        if last_page <= first_page:
            return
        g, n = self.page_size, (last_page - first_page) * self.page_size
        k = own_k[0, :, :n].to(torch.float32, copy=True)  # [H, n, D]
        v = own_v[0, :, :n].to(torch.float32, copy=True)
        quantized = max(0, last_page - max(first_page, self.sink_pages))
        if quantized:
            h, d = k.shape[0], k.shape[2]
            kp = k[:, n - quantized * g :].reshape(h, quantized, g, d).permute(1, 2, 0, 3)
            vp = v[:, n - quantized * g :].reshape(h, quantized, g, d).permute(1, 2, 0, 3)
            records = self.method.quantize_pages(kp, vp)
            self.records.append(records)
            kd, vd = self.method.dequantize_pages(records)  # [P, G, H, D]
            k[:, n - quantized * g :] = kd.permute(2, 0, 1, 3).reshape(h, quantized * g, d)
            v[:, n - quantized * g :] = vd.permute(2, 0, 1, 3).reshape(h, quantized * g, d)
        self.read_k = torch.cat([self.read_k, k[None]], 2)
        self.read_v = torch.cat([self.read_v, v[None]], 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    @property
    def committed_pages(self) -> int:
        """Pages stored as packed records."""
        return sum(r.shape[0] for r in self.records)


class PagedQuantizedCache(Cache):
    """A ``Cache`` of ``PagedQuantizedLayer``, one per decoder layer."""

    def __init__(self, num_layers: int, method: PageMethod, sink_pages: int = 1) -> None:
        if sink_pages < 0:
            raise ValueError(f"Unsupported sink_pages {sink_pages}: expected >= 0")
        super().__init__(
            layers=[PagedQuantizedLayer(method, sink_pages) for _ in range(num_layers)]
        )
        self.method, self.sink_pages = method, sink_pages


def greedy_generate(
    model,
    prompt_ids: torch.Tensor,
    new_tokens: int,
    method: PageMethod | None,
    *,
    sink_pages: int = 1,
) -> torch.Tensor:
    """Greedy decoding of ``new_tokens`` tokens after ``prompt_ids`` ``[1, P]`` (EOS ignored).

    With ``method=None`` the model runs unchanged with its usual cache (the reference);
    otherwise with a ``PagedQuantizedCache`` and decode-consistent quantized attention.
    Returns the generated ids ``int64 [new_tokens]``.
    """
    from transformers import DynamicCache

    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(
            f"Invalid shape of prompt_ids: expected [1, P], got {list(prompt_ids.shape)}"
        )
    if method is None:
        cache, mode = DynamicCache(config=model.config), nullcontext()
    else:
        cache = PagedQuantizedCache(model.config.num_hidden_layers, method, sink_pages)
        mode = paged_attention_mode(model, method, sink_pages=sink_pages, cache=cache)
    out, ids = [], prompt_ids
    with mode, torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            ids = logits[:, -1:].argmax(-1)
            out.append(ids[0, 0])
    return torch.stack(out) if out else prompt_ids.new_zeros(0)
