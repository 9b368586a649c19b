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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
) -> torch.Tensor:
    """``decode_consistent_attention`` computed page by page, heads first, with SDPA.

    Never materialises the ``[Hq, T, 2T]`` score tensor: the queries of page j attend to
    ``k_read[:, :j*G]`` followed by their own page's unquantized tokens (causal), one SDPA
    call per page with GQA handled by SDPA.

    Args:
        q: ``[Hq, T, D]`` queries at positions ``q_start .. q_start+T-1``.
        k_read, v_read: ``[Hkv, R, D]``, positions ``0..R-1`` as later pages read them;
            R must reach the start of the last query's page.
        k_own, v_own: ``[Hkv, M, D]`` unquantized positions ``own_start .. own_start+M-1``,
            with ``own_start`` the start of the first query's page and M reaching the last query.
        recent_pages: the queries of page j also read pages ``j - recent_pages .. j - 1``
            from ``k_own``/``v_own`` (a recent window); ``own_start`` must then reach back
            that far (0 in a full forward).
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
    if k_read.shape[1] < (q_end - 1) // g * g:
        raise ValueError(
            f"Invalid shape of k_read: expected [{hkv}, >= {(q_end - 1) // g * g}, {d}], "
            f"got {list(k_read.shape)}"
        )
    qf, out = q.float(), q.new_empty(hq, t, d, dtype=torch.float32)
    for page in range(q_start // g, (q_end - 1) // g + 1):
        lo, hi = max(q_start, page * g), min(q_end, (page + 1) * g)
        split = max(page - recent_pages, 0) * g
        own = slice(split - own_start, hi - own_start)
        k = torch.cat([k_read[:, :split], k_own[:, own]], 1).float()
        v = torch.cat([v_read[:, :split], v_own[:, own]], 1).float()
        q_pos = torch.arange(lo, hi, device=q.device)[:, None]
        k_pos = torch.arange(k.shape[1], device=q.device)[None, :]
        mask = k_pos <= q_pos  # read pages are all before the page, own tokens causal
        out[:, lo - q_start : hi - q_start] = F.scaled_dot_product_attention(
            qf[:, lo - q_start : hi - q_start],
            k,
            v,
            attn_mask=mask,
            scale=sm_scale,
            enable_gqa=True,
        )
    return out
