"""The executable spec of KVarN in plain torch: quantizer, packing and attention semantics.

Everything is batched over pages and KV heads and computed in fp32. Kernels in
``kvarn_sglang.kernels`` are tested against these functions; clarity wins over speed here.

Per tile of G tokens of one KV head (``KVARN_SPEC.md`` section 1):
  1. rotate along head_dim by the normalized Sylvester Hadamard matrix H (H @ H = I);
  2. orient: K as ``[D, G]`` (rows = channels), V as ``[G, D]`` (rows = tokens);
  3. Sinkhorn-like variance normalization in the log domain, keeping per tile the scales
     of lowest imbalance seen;
  4. asymmetric round-to-nearest (ties to even) per row of the balanced tile (``_plus``
     presets: then least-squares refits of each row's scale/zero that clip nothing,
     ``rtn.refit_rows``);
  5. absorb the normalization into fp16 metadata: ``x = (q * scale[r] + zero[r]) * norm[c]``;
  6. pack the codes in the planar order of ``kvarn_sglang.format.layout`` (token-major ``[G, D]``,
     channel c in byte c % (D/per) at bit (c // (D/per)) * bits; K as is, V transposed).

Metadata is stored in fp16. Rows and columns can trade a power of two without changing
any product, so each tile is rebalanced by one power of two before rounding to fp16: this
is exact in the normal fp16 range and keeps huge (~6e4) and tiny (~1e-6) tiles representable.

Non-finite input is rejected: ``quantize_pages`` raises ``ValueError`` naming the first bad
(page, KV head) before anything is produced, so nothing already stored can be touched.

Attention semantics ("decode-consistent"): a token at position p attends to every full page
before its own page read quantized (sink pages excepted, read fp16) and to the tokens of its
own page up to p in fp16, exactly as if it had been decoded one token at a time.
"""

from __future__ import annotations

import torch

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.layout import PageLayout, TileCodes, decode_tiles, encode_tiles
from kvarn_sglang.format.layout import pack_codes as pack_codes  # re-exported: packing is spec
from kvarn_sglang.format.layout import unpack_codes as unpack_codes
from kvarn_sglang.format.numerics import (
    LOG_MAX,
    LOG_MIN,
    STD_MAX,
    STD_MIN,
    PagedKVCache,
    check_pages,
    hadamard_matrix,
)
from kvarn_sglang.quant.page_attention import FULL, LayerAttention, paged_attention
from kvarn_sglang.quant.rtn import refit_rows as refit_rows
from kvarn_sglang.quant.rtn import rtn_quantize as rtn_quantize


# ----------------------------------------------------------------------------- rotation
def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` along the last dim, in fp32. H is its own inverse, so this also un-rotates."""
    return x.float() @ hadamard_matrix(x.shape[-1], x.device)


# -------------------------------------------------------------------- normalization
def _std(m: torch.Tensor, dim: int) -> torch.Tensor:
    """Unbiased std along ``dim`` (dims kept) in two passes, mean then squared deviations: what
    the commit kernel computes, and an order of magnitude faster on a CPU than ``Tensor.std``
    (a Welford loop there); the two agree to about 1e-7 relative."""
    n = m.shape[dim]
    dev = m - m.sum(dim, keepdim=True) / n
    return ((dev * dev).sum(dim, keepdim=True) / (n - 1)).sqrt()


def _imbalance(m: torch.Tensor) -> torch.Tensor:
    """``max/min`` of column stds plus ``max/min`` of row stds, per tile. m: [N, R, C] -> [N]."""
    col = _std(m, 1).squeeze(1)
    row = _std(m, 2).squeeze(2)
    return col.amax(1) / col.amin(1).clamp_min(1e-8) + row.amax(1) / row.amin(1).clamp_min(1e-8)


def variance_normalize(m: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn-like log-domain variance normalization of a batch of tiles.

    Args:
        m: ``fp32 [N, R, C]``, N independent tiles.
        iters: alternating column/row updates; the best (lowest-imbalance) scales seen are
            kept per tile, the all-ones start included, ties going to the newer.
    Returns:
        ``(row_norm [N, R, 1], col_norm [N, 1, C])`` with ``balanced = m / col_norm / row_norm``.
    """
    n, r, c = m.shape
    log_c = m.new_zeros(n, 1, c)
    log_r = m.new_zeros(n, r, 1)
    best_c, best_r = log_c, log_r
    best_imb = _imbalance(m)
    for _ in range(iters):
        cur = m / log_c.exp() / log_r.exp()
        col_std = _std(cur, 1).clamp(STD_MIN, STD_MAX)
        log_c = (log_c + col_std.log()).clamp(LOG_MIN, LOG_MAX)
        cur = m / log_c.exp() / log_r.exp()
        row_std = _std(cur, 2).clamp(STD_MIN, STD_MAX)
        log_r = (log_r + row_std.log()).clamp(LOG_MIN, LOG_MAX)
        cur = m / log_c.exp() / log_r.exp()
        imb = _imbalance(cur)
        better = (imb <= best_imb).view(n, 1, 1)
        best_c = torch.where(better, log_c, best_c)
        best_r = torch.where(better, log_r, best_r)
        best_imb = torch.minimum(imb, best_imb)
    return best_r.exp(), best_c.exp()


# --------------------------------------------------------------- oriented tiles
def _pow2_rebalance(row_mag: torch.Tensor, col_mag: torch.Tensor) -> torch.Tensor:
    """Per-tile power of two c that brings max(row factors) * c and max(col factors) / c to
    the same magnitude. row_mag, col_mag: ``[N]`` -> ``[N]``."""
    lr = row_mag.clamp_min(1e-30).log2()
    lc = col_mag.clamp_min(1e-30).log2()
    return torch.exp2(torch.round((lc - lr) / 2))


def quantize_oriented(
    m: torch.Tensor,
    bits: int,
    sinkhorn_iters: int | None,
    clip_quantile: float = 0.0,
    refit_iters: int = 0,
    check_range: bool = True,
) -> TileCodes:
    """Quantize a batch of oriented tiles ``fp32 [N, R, C]`` row-wise.

    With an int ``sinkhorn_iters`` the tile is variance-normalized first and the
    normalization is absorbed into the metadata (KVarN; 0 iterations keep the format with a
    norm of ones); with None it is plain per-row RTN without a norm (KIVI, RTN per token).
    ``refit_iters`` least-squares refits (``rtn.refit_rows`` with ``cover``, weighted by the
    squared column norms) follow the RTN of a normalized tile. A tile whose metadata does not
    fit fp16 raises ``ValueError``, or with ``check_range=False`` keeps its Inf/NaN metadata
    (the serving path checks the records it commits: ``request_guard.guard_scales``).
    """
    if sinkhorn_iters is not None:
        row_norm, col_norm = variance_normalize(m, sinkhorn_iters)
        bal = m / col_norm / row_norm
        codes, scale, zero = rtn_quantize(bal, bits, clip_quantile)
        if refit_iters:
            w = col_norm.square()
            codes, scale, zero = refit_rows(bal, w, codes, scale, zero, bits, refit_iters, True)
        scale, zero, col = scale * row_norm, zero * row_norm, col_norm.squeeze(1)
        row_mag = torch.maximum(scale.abs().amax((1, 2)), zero.abs().amax((1, 2)))
        c = _pow2_rebalance(row_mag, col.abs().amax(1))
        scale, zero, col = scale * c.view(-1, 1, 1), zero * c.view(-1, 1, 1), col / c.view(-1, 1)
        norm = col.half()
    else:
        codes, scale, zero = rtn_quantize(m, bits, clip_quantile)
        norm = None
    scale, zero = scale.squeeze(2).half(), zero.squeeze(2).half()
    bad = ~(torch.isfinite(scale).all(1) & torch.isfinite(zero).all(1))
    if norm is not None:
        bad |= ~torch.isfinite(norm).all(1)
    if check_range and bad.any():
        raise ValueError(
            f"Tile {int(bad.nonzero()[0])} exceeds the fp16 metadata range "
            f"(|values| up to {m.abs().amax().item():.3g})"
        )
    return TileCodes(codes, scale, zero, norm)


def dequantize_oriented(t: TileCodes) -> torch.Tensor:
    """Reconstruct ``fp32 [N, R, C]`` from ``TileCodes``."""
    x = t.codes.float() * t.scale.float().unsqueeze(2) + t.zero.float().unsqueeze(2)
    if t.norm is not None:
        x = x * t.norm.float().unsqueeze(1)
    return x


# ------------------------------------------------------------------ validation
# ------------------------------------------------------------------- tile pages
def _tiles(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``[P, G, H, D]`` -> oriented tiles ``[P*H, D, G]`` (per channel) or ``[P*H, G, D]``."""
    p, g, h, d = x.shape
    t = x.permute(0, 2, 1, 3).reshape(p * h, g, d)
    return t.transpose(1, 2) if per_channel else t


def _untiles(t: torch.Tensor, per_channel: bool, p: int, h: int) -> torch.Tensor:
    """Inverse of ``_tiles``: oriented tiles -> ``[P, G, H, D]``."""
    if per_channel:
        t = t.transpose(1, 2)
    return t.reshape(p, h, *t.shape[1:]).permute(0, 2, 1, 3)


def quantize_tile_pages(
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PageLayout,
    *,
    k_bits: int,
    v_bits: int,
    rotated: bool,
    k_per_channel: bool,
    sinkhorn_iters: int | None,
    clip_quantile: float = 0.0,
    refit_iters: int = 0,
    check_range: bool = True,
) -> torch.Tensor:
    """Quantize pages with any tile method (KVarN, its ablations, KIVI, RTN per token).

    Args:
        k, v: ``[P, G, H, D]`` float, already validated.
        layout: the method's ``tile_layout``.
        rotated: apply the Hadamard rotation along head_dim first.
        k_per_channel: orient K ``[D, G]`` (per channel) instead of ``[G, D]`` (per token).
        sinkhorn_iters: variance-normalization iterations, None for plain RTN (no norm).
    Returns:
        ``uint8 [P, H, layout.page_bytes]``.
    """
    p, _, h, _ = k.shape
    k, v = (rotate(k), rotate(v)) if rotated else (k.float(), v.float())
    k_t = quantize_oriented(
        _tiles(k, k_per_channel), k_bits, sinkhorn_iters, clip_quantile, refit_iters, check_range
    )
    v_t = quantize_oriented(
        _tiles(v, False), v_bits, sinkhorn_iters, clip_quantile, refit_iters, check_range
    )
    return encode_tiles(k_t, v_t, layout, p, h)


def dequantize_tile_pages(
    records: torch.Tensor, layout: PageLayout, *, rotated: bool, k_per_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``quantize_tile_pages``: records -> K, V ``fp32 [P, G, H, D]``, rotated
    back to the model's domain when ``rotated``."""
    p, h, _ = records.shape
    k_t, v_t = decode_tiles(records, layout)
    k = _untiles(dequantize_oriented(k_t), k_per_channel, p, h)
    v = _untiles(dequantize_oriented(v_t), False, p, h)
    return (rotate(k), rotate(v)) if rotated else (k, v)


def quantize_pages(
    k: torch.Tensor, v: torch.Tensor, config: KVarNConfig, *, check_range: bool = True
) -> torch.Tensor:
    """KVarN-quantize full pages into packed records.

    Args:
        k, v: ``[num_pages, G, num_kv_heads, head_dim]`` fp16/bf16/fp32, finite (post-RoPE K).
        config: G and head_dim must match the inputs.
        check_range: raise ``ValueError`` for a page whose scales do not fit fp16 (finite bf16
            values beyond about 1e9); False stores them as Inf/NaN, as the Triton commit does.
    Returns:
        ``uint8 [num_pages, num_kv_heads, config.page_bytes]`` laid out as ``config.layout``.
    """
    check_pages("k", k, config.page_size, config.head_dim)
    check_pages("v", v, config.page_size, config.head_dim)
    if k.shape != v.shape:
        raise ValueError(f"Invalid shape of v: expected {list(k.shape)}, got {list(v.shape)}")
    return quantize_tile_pages(
        k,
        v,
        config.layout,
        k_bits=config.k_bits,
        v_bits=config.v_bits,
        rotated=True,
        k_per_channel=True,
        sinkhorn_iters=config.sinkhorn_iters,
        clip_quantile=config.clip_quantile,
        refit_iters=config.refit_iters,
        check_range=check_range,
    )


def ref_commit_pages(k: torch.Tensor, v: torch.Tensor, config: KVarNConfig) -> torch.Tensor:
    """Spec of the commit kernel (``kvarn_sglang.kernels.commit.commit_pages``): the records
    ``quantize_pages`` produces."""
    return quantize_pages(k, v, config)


def dequantize_pages(
    records: torch.Tensor, config: KVarNConfig, *, rotated: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct K, V ``fp32 [num_pages, G, num_kv_heads, head_dim]`` from packed records.

    With ``rotated=True`` the result stays in the Hadamard domain (what a kernel computes
    with a rotated query); by default it is rotated back to the model's domain.
    """
    if records.dim() != 3:
        raise ValueError(
            f"Invalid shape of records: expected [num_pages, num_kv_heads, {config.page_bytes}], "
            f"got {list(records.shape)}"
        )
    k, v = dequantize_tile_pages(records, config.layout, rotated=False, k_per_channel=True)
    return (k, v) if rotated else (rotate(k), rotate(v))


# -------------------------------------------------------------------- attention
def decode_consistent_attention(
    q: torch.Tensor,
    q_pos: torch.Tensor,
    k_read: torch.Tensor,
    v_read: torch.Tensor,
    k_own: torch.Tensor,
    v_own: torch.Tensor,
    own_start: int,
    page_size: int,
    sm_scale: float,
    attn: LayerAttention = FULL,
) -> torch.Tensor:
    """Attention of one sequence's queries with decode-consistent semantics.

    Args:
        q: ``[T, Hq, D]`` queries at absolute positions ``q_pos`` ``[T]``.
        k_read, v_read: ``[L, Hkv, D]``, positions ``0..L-1`` as read from finished pages
            (dequantized pages, fp16 sink pages); read by queries of later pages only.
        k_own, v_own: ``[M, Hkv, D]``, fp16 values of positions ``own_start..own_start+M-1``;
            read by queries of the same page, causally.
        attn: a sliding window (keys before ``q_pos - window_left`` masked), logit
            soft-capping and learned sinks (an extra softmax logit per query head).
    Returns:
        ``fp32 [T, Hq, D]``.
    """
    hq, hkv = q.shape[1], k_read.shape[1]
    group = hq // hkv
    qf = q.float()

    def scores(k: torch.Tensor, pos: torch.Tensor, same_page: bool) -> torch.Tensor:
        s = torch.einsum("thd,shd->hts", qf, k.float().repeat_interleave(group, 1)) * sm_scale
        if attn.softcap:
            s = attn.softcap * torch.tanh(s / attn.softcap)
        q_page, k_page = (q_pos // page_size)[:, None], (pos // page_size)[None, :]
        if same_page:
            mask = (k_page == q_page) & (pos[None, :] <= q_pos[:, None])
        else:
            mask = k_page < q_page
        if attn.window_left is not None:
            mask = mask & (pos[None, :] >= q_pos[:, None] - attn.window_left)
        return s.masked_fill(~mask, float("-inf"))

    pos_read = torch.arange(k_read.shape[0], device=q.device)
    pos_own = torch.arange(own_start, own_start + k_own.shape[0], device=q.device)
    s = torch.cat([scores(k_read, pos_read, False), scores(k_own, pos_own, True)], dim=2)
    if attn.sinks is not None:
        sink = attn.sinks.float().to(q.device).view(hq, 1, 1).expand(hq, s.shape[1], 1)
        prob = torch.softmax(torch.cat([s, sink], 2), dim=2)[..., :-1]
    else:
        prob = torch.softmax(s, dim=2)
    v = torch.cat([v_read, v_own], 0).float().repeat_interleave(group, 1)
    return torch.einsum("hts,shd->thd", prob, v)


def ref_decode_consistent_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: KVarNConfig, sm_scale: float
) -> torch.Tensor:
    """Dense spec: one sequence from position 0, q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``.

    Full pages past the sink are quantized with KVarN; each query reads earlier pages
    quantized (sinks fp16) and its own page fp16. Returns ``fp32 [T, Hq, D]``.
    """
    g, t = config.page_size, q.shape[0]
    k_read, v_read = k.float().clone(), v.float().clone()
    first, full = config.sink_pages, t // g
    if full > first:
        pages = slice(first * g, full * g)
        kp = k[pages].reshape(full - first, g, *k.shape[1:])
        vp = v[pages].reshape(full - first, g, *v.shape[1:])
        kd, vd = dequantize_pages(quantize_pages(kp, vp, config), config)
        k_read[pages], v_read[pages] = kd.flatten(0, 1), vd.flatten(0, 1)
    pos = torch.arange(t, device=q.device)
    return decode_consistent_attention(q, pos, k_read, v_read, k, v, 0, g, sm_scale)


def read_pages(
    cache: PagedKVCache, pages: torch.Tensor, config: KVarNConfig, fp16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V ``fp32 [len(pages) * G, Hkv, D]`` of pages, from fp16 slots or packed records."""
    if len(pages) == 0:
        shape = (0, *cache.slot_k.shape[2:])
        return cache.slot_k.new_zeros(shape).float(), cache.slot_v.new_zeros(shape).float()
    if fp16:
        slots = cache.page_slot[pages]
        if (slots < 0).any():
            missing = int(pages[slots < 0][0])
            raise ValueError(f"Page {missing} must be read in fp16 but has no fp16 slot")
        k, v = cache.slot_k[slots], cache.slot_v[slots]
        return k.flatten(0, 1).float(), v.flatten(0, 1).float()
    k, v = dequantize_pages(cache.packed[pages], config)
    return k.flatten(0, 1), v.flatten(0, 1)


def read_finished_pages(
    cache: PagedKVCache, pages: torch.Tensor, config: KVarNConfig, first_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finished pages as a later page reads them: sinks fp16, the rest packed.
    ``first_index``: the index in its sequence of ``pages[0]`` (pages before it not read)."""
    sink = min(max(config.sink_pages - first_index, 0), len(pages))
    ks, vs = read_pages(cache, pages[:sink], config, fp16=True)
    kq, vq = read_pages(cache, pages[sink:], config, fp16=False)
    return torch.cat([ks, kq]), torch.cat([vs, vq])


def ref_decode_attention(
    q: torch.Tensor,
    cache: PagedKVCache,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    config: KVarNConfig,
    sm_scale: float,
    attn: LayerAttention = FULL,
) -> torch.Tensor:
    """Decode attention over a page table: q ``[B, Hq, D]`` is the last token of each request.

    Args:
        page_table: ``int [B, max_pages]`` page ids of each request in order.
        seq_lens: ``int [B]`` tokens per request, the current token included.
        attn: the layer's window, soft-capping, sinks; pages before the window are not read.
    Returns:
        ``fp32 [B, Hq, D]``.
    """
    g = config.page_size
    out = []
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        own = (n - 1) // g
        first = min(attn.first_key(n - 1) // g, own)
        k_read, v_read = read_finished_pages(cache, page_table[b, first:own], config, first)
        k_own, v_own = read_pages(cache, page_table[b, own : own + 1], config, fp16=True)
        last = n - own * g
        o = paged_attention(
            q[b : b + 1].transpose(0, 1), n - 1, k_read.transpose(0, 1),
            v_read.transpose(0, 1), k_own[:last].transpose(0, 1), v_own[:last].transpose(0, 1),
            own * g, g, sm_scale, attn=attn, read_start=first * g,
        )  # fmt: skip
        out.append(o[:, 0])
    return torch.stack(out)


def ref_extend_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: PagedKVCache,
    page_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    config: KVarNConfig,
    sm_scale: float,
    attn: LayerAttention = FULL,
) -> torch.Tensor:
    """Decode-consistent extend (prefill, chunked prefill, prefix-cache hit).

    Args:
        q: ``[T, Hq, D]`` new tokens of all requests, concatenated in request order.
        k_new, v_new: ``[T, Hkv, D]`` their K (post-RoPE) and V.
        cache: holds each request's prefix and, committed, every page that became full in
            this extend; a prefix page left partial is in an fp16 slot.
        page_table: ``int [B, max_pages]``; prefix_lens, extend_lens: ``int [B]``.
        attn: the layer's window, soft-capping, sinks; pages before the window are not read.
    Returns:
        ``fp32 [T, Hq, D]``.
    """
    g = config.page_size
    out, start = [], 0
    for b in range(page_table.shape[0]):
        pre, ext = int(prefix_lens[b]), int(extend_lens[b])
        rows = slice(start, start + ext)
        start += ext
        if ext == 0:
            continue
        first_own, last_own = pre // g, (pre + ext - 1) // g
        first = min(attn.first_key(pre) // g, first_own)
        k_read, v_read = read_finished_pages(cache, page_table[b, first:last_own], config, first)
        own_start = first_own * g
        own_page = page_table[b, first_own : first_own + 1 if pre > own_start else first_own]
        k_pre, v_pre = read_pages(cache, own_page, config, fp16=True)
        k_pre, v_pre = k_pre[: pre - own_start], v_pre[: pre - own_start]
        k_own = torch.cat([k_pre, k_new[rows].float()])
        v_own = torch.cat([v_pre, v_new[rows].float()])
        o = paged_attention(
            q[rows].transpose(0, 1), pre, k_read.transpose(0, 1), v_read.transpose(0, 1),
            k_own.transpose(0, 1), v_own.transpose(0, 1), own_start, g, sm_scale,
            attn=attn, read_start=first * g,
        )  # fmt: skip
        out.append(o.transpose(0, 1))
    return torch.cat(out) if out else q.new_zeros(0, *q.shape[1:]).float()
