"""Decode-consistent attention computed page by page with SDPA (plain torch, any device).

The queries of page j attend to every earlier position as later pages read it (sink pages
fp16, the rest dequantized) followed by their own page's unquantized tokens, causally: one
``scaled_dot_product_attention`` call per page.

Why per page: the result for a query then depends only on its page's queries in this call
and on the keys before them, never on how the rest of the sequence was split into passes.
A prompt served from the prefix cache recomputes its last, partial page with exactly the
queries and keys that the uncached run used for that page, so a cache hit computes the same
bits as a miss (matrix products on a CPU are not invariant to their row count, so a single
call over all queries of a chunk would not give this). The reference attention
(``kvarn_sglang.quant.reference``), the CPU serving path and ``kvarn-sglang eval`` all use it.

A layer's attention variant (``LayerAttention``) changes what a query reads, never what is
stored:

* a sliding window (``window_left``): a query at position p reads keys at positions
  ``>= p - window_left`` only (SGLang's ``sliding_window_size``, flash-attention's left
  window; Hugging Face's ``sliding_window`` is ``window_left + 1``). Pages wholly before the
  window are not read; the page holding the window's first key is masked;
* logit soft-capping (``softcap``): scores become ``softcap * tanh(scores / softcap)``;
* learned attention sinks (``sinks``, one logit per query head, gpt-oss): an extra logit in
  every softmax denominator whose value vector is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerAttention:
    """What one attention layer computes beyond causal softmax attention.

    Attributes:
        window_left: a query at position p reads keys at positions ``>= p - window_left``;
            None for full attention.
        softcap: logit soft-capping ``softcap * tanh(s / softcap)``; None or 0 for none.
        sinks: ``fp32 [Hq]`` learned sink logits (an extra softmax term with a zero value
            vector); None for none.
    """

    window_left: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.window_left is not None and self.window_left < 0:
            raise ValueError(f"Unsupported window_left {self.window_left}: expected >= 0 or None")
        if self.softcap is not None and self.softcap < 0:
            raise ValueError(f"Unsupported softcap {self.softcap}: expected >= 0 or None")

    @property
    def is_plain(self) -> bool:
        """Causal softmax attention over every earlier position."""
        return self.window_left is None and not self.softcap and self.sinks is None

    def first_key(self, q_pos: int) -> int:
        """The first position a query at ``q_pos`` reads."""
        return 0 if self.window_left is None else max(0, q_pos - self.window_left)


FULL = LayerAttention()


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sm_scale: float,
    attn: LayerAttention,
) -> torch.Tensor:
    """fp32 attention of ``q [Hq, T, D]`` over ``k, v [Hkv, S, D]`` with ``mask [T, S]``."""
    if not attn.softcap and attn.sinks is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=sm_scale, enable_gqa=True
        )
    group = q.shape[0] // k.shape[0]
    s = torch.einsum("htd,hsd->hts", q, k.repeat_interleave(group, 0)) * sm_scale
    if attn.softcap:
        s = attn.softcap * torch.tanh(s / attn.softcap)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    if attn.sinks is not None:
        sink = attn.sinks.float().to(q.device).view(-1, 1, 1).expand_as(lse)
        lse = torch.logaddexp(lse, sink)
    return torch.einsum("hts,hsd->htd", torch.exp(s - lse), v.repeat_interleave(group, 0))


def paged_attention(
    q: torch.Tensor,
    q_start: int,
    k_read: torch.Tensor,
    v_read: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    own_start: int,
    page_size: int,
    sm_scale: float,
    recent_pages: int = 0,
    attn: LayerAttention = FULL,
    read_start: int = 0,
) -> torch.Tensor:
    """``decode_consistent_attention`` computed page by page, heads first, with SDPA.

    Never materialises the ``[Hq, T, 2T]`` score tensor: the queries of page j attend to
    ``k_read[:, :j*G]`` followed by their own page's unquantized tokens (causal), one SDPA
    call per page with GQA handled by SDPA.

    Args:
        q: ``[Hq, T, D]`` queries at positions ``q_start .. q_start+T-1``.
        k_read, v_read: ``[Hkv, R, D]``, positions ``read_start..read_start+R-1`` as later
            pages read them; they must reach the start of the last query's page.
            ``read_start`` (a page boundary) may skip pages that no query's window reaches.
        k_own, v_own: ``[Hkv, M, D]`` unquantized positions ``own_start .. own_start+M-1``,
            with ``own_start`` the start of the first query's page and M reaching the last query.
        recent_pages: the queries of page j also read pages ``j - recent_pages .. j - 1``
            from ``k_own``/``v_own`` (a recent window); ``own_start`` must then reach back
            that far (0 in a full forward).
        attn: the layer's window, soft-capping and sinks (see the module docstring).
    Returns:
        ``fp32 [Hq, T, D]``.
    """
    if k_read.dim() != 3 or k_own.dim() != 3:
        raise ValueError(
            f"Invalid shape of k_read: expected [num_kv_heads, R, head_dim] (and k_own "
            f"[num_kv_heads, M, head_dim]), got {list(k_read.shape)} and {list(k_own.shape)}"
        )
    hkv, d = k_read.shape[0], k_read.shape[2]
    if q.dim() != 3 or q.shape[0] % hkv or q.shape[2] != d:
        raise ValueError(
            f"Invalid shape of q: expected [num_q_heads (multiple of {hkv}), T, {d}], "
            f"got {list(q.shape)}"
        )
    hq, t, _ = q.shape
    g, q_end = page_size, q_start + t
    if recent_pages < 0 or (recent_pages and own_start != 0):
        raise ValueError(
            f"Unsupported recent_pages {recent_pages}: expected >= 0, and > 0 only with "
            f"own_start 0 (got {own_start})"
        )
    if own_start != q_start // g * g or own_start + k_own.shape[1] < q_end:
        raise ValueError(
            f"Invalid shape of k_own: expected [{hkv}, >= {q_end - q_start // g * g}, {d}] "
            f"from position {q_start // g * g}, got {list(k_own.shape)} from {own_start}"
        )
    if read_start % g or read_start > attn.first_key(q_start) // g * g:
        raise ValueError(
            f"Unsupported read_start {read_start}: expected a multiple of {g} at most "
            f"{attn.first_key(q_start) // g * g} (the first page the first query reads)"
        )
    if read_start + k_read.shape[1] < (q_end - 1) // g * g:
        raise ValueError(
            f"Invalid shape of k_read: expected [{hkv}, >= {(q_end - 1) // g * g - read_start}, "
            f"{d}] from position {read_start}, got {list(k_read.shape)}"
        )
    if attn.sinks is not None and attn.sinks.shape != (hq,):
        raise ValueError(f"Invalid shape of sinks: expected [{hq}], got {list(attn.sinks.shape)}")
    qf, out = q.float(), q.new_empty(hq, t, d, dtype=torch.float32)
    for page in range(q_start // g, (q_end - 1) // g + 1):
        lo, hi = max(q_start, page * g), min(q_end, (page + 1) * g)
        split = max(page - recent_pages, 0) * g
        first = min(attn.first_key(lo) // g * g, split)  # pages before it are not read
        own = slice(split - own_start, hi - own_start)
        read = slice(first - read_start, split - read_start)
        k = torch.cat([k_read[:, read], k_own[:, own]], 1).float()
        v = torch.cat([v_read[:, read], v_own[:, own]], 1).float()
        q_pos = torch.arange(lo, hi, device=q.device)[:, None]
        k_pos = torch.arange(first, first + k.shape[1], device=q.device)[None, :]
        mask = k_pos <= q_pos  # read pages are all before the page, own tokens causal
        if attn.window_left is not None:
            mask = mask & (k_pos >= q_pos - attn.window_left)
        out[:, lo - q_start : hi - q_start] = _attend(
            qf[:, lo - q_start : hi - q_start], k, v, mask, sm_scale, attn
        )
    return out
