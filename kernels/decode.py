"""Decode attention over KVarN pages: one query token per request, split-KV, two stages.

Sizes: stage 1 runs one program per (request, KV head, split); it serves all GROUP query
heads of the KV head at once (padded to BLOCK_H >= 16 rows for tl.dot), so every packed tile
is unpacked once per KV head. A page is read

* from its fp16 slot (``slot_k/slot_v [num_slots, G, Hkv, D]``) when it is a sink page or the
  request's own (last) page, against the plain query;
* from its packed record (``uint8 [num_pages, Hkv, page_bytes]``) otherwise, against the
  Hadamard-rotated query, with the scales folded in (KVARN_SPEC.md section 4):
  ``s_t = k_norm[t] * ((q * k_scale) . code_t + q . k_zero)`` and
  ``o += v_norm * (sum_t (p_t v_scale[t]) code_t + sum_t p_t v_zero[t])``.

The two kinds accumulate separately (rotated and plain domain) under one online softmax in
the log2 domain. Stage 2 merges the splits with their log-sum-exp and rotates the packed
part back: ``out = (acc_rot @ H + acc_plain) / l``. The grid depends only on shapes
(``max_splits``), never on sequence lengths, so the launch needs no host synchronisation and
can be captured in a CUDA graph.

Reference: ``kvarn_sglang.reference.ref_decode_attention``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvarn_sglang.config import KVarNConfig
from kvarn_sglang.kernels.page_tiles import fp16_page_step, packed_page_step, record_offsets
from kvarn_sglang.kernels.validate import check_paged_inputs, slot_operand_dtype
from kvarn_sglang.reference import PagedKVCache, hadamard_matrix

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, qr_ptr,  # [B, Hq, D] fp32 plain and rotated queries, contiguous
    pk_u8_ptr, pk_f16_ptr, stride_pp, stride_ph,  # packed records, strides in bytes
    sk_ptr, sv_ptr, stride_ss, stride_sg, stride_sh,  # fp16 slots [S, G, Hkv, D]
    page_slot_ptr, table_ptr, stride_tb, seq_lens_ptr,
    mid_m_ptr, mid_l_ptr, mid_ar_ptr, mid_ap_ptr,  # [B, Hq, S] and [B, Hq, S, D] fp32
    qk_scale, sink_pages,
    kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, SPLITS: tl.constexpr,
    SLOT_DT: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(seq_lens_ptr + b).to(tl.int32)
    num_pages = tl.cdiv(n, G)
    own = (n - 1) // G
    per_split = tl.cdiv(num_pages, SPLITS)
    start = split * per_split
    end = tl.minimum(start + per_split, num_pages)

    hh = tl.arange(0, BLOCK_H)
    hmask = hh < GROUP
    heads = kvh * GROUP + hh
    ch = tl.arange(0, D)
    tok = tl.arange(0, G)
    q_off = (b * HQ + heads)[:, None] * D + ch[None, :]
    q = tl.load(q_ptr + q_off, mask=hmask[:, None], other=0.0).to(SLOT_DT)
    qr = tl.load(qr_ptr + q_off, mask=hmask[:, None], other=0.0)

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc_r = tl.zeros((BLOCK_H, D), tl.float32)
    acc_p = tl.zeros((BLOCK_H, D), tl.float32)
    for j in range(start, end):
        page = tl.load(table_ptr + b * stride_tb + j)
        if (j < sink_pages) | (j == own):
            slot = tl.load(page_slot_ptr + page)
            valid = tok < tl.minimum(G, n - j * G)
            kv_off = slot * stride_ss + tok[:, None] * stride_sg + kvh * stride_sh + ch[None, :]
            k = tl.load(sk_ptr + kv_off, mask=valid[:, None], other=0.0).to(SLOT_DT)
            v = tl.load(sv_ptr + kv_off, mask=valid[:, None], other=0.0).to(SLOT_DT)
            m_i, l_i, acc_r, acc_p = fp16_page_step(
                q, k, v, valid[None, :], m_i, l_i, acc_r, acc_p, qk_scale
            )
        else:
            m_i, l_i, acc_r, acc_p = packed_page_step(
                qr, pk_u8_ptr, pk_f16_ptr, page * stride_pp + kvh * stride_ph,
                kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
                m_i, l_i, acc_r, acc_p, qk_scale, G, D, K_BITS, V_BITS,
            )  # fmt: skip

    mid = (b * HQ + heads) * SPLITS + split
    tl.store(mid_m_ptr + mid, m_i, mask=hmask)
    tl.store(mid_l_ptr + mid, l_i, mask=hmask)
    tl.store(mid_ar_ptr + mid[:, None] * D + ch[None, :], acc_r, mask=hmask[:, None])
    tl.store(mid_ap_ptr + mid[:, None] * D + ch[None, :], acc_p, mask=hmask[:, None])


@triton.jit
def _decode_merge_kernel(
    mid_m_ptr, mid_l_ptr, mid_ar_ptr, mid_ap_ptr, h_ptr, out_ptr,
    HQ: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    SPLITS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < GROUP
    heads = kvh * GROUP + hh
    ch = tl.arange(0, D)
    m_all = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    for s in range(SPLITS):
        m_s = tl.load(mid_m_ptr + (b * HQ + heads) * SPLITS + s, mask=hmask, other=float("-inf"))
        m_all = tl.maximum(m_all, m_s)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.zeros((BLOCK_H,), tl.float32)
    acc_r = tl.zeros((BLOCK_H, D), tl.float32)
    acc_p = tl.zeros((BLOCK_H, D), tl.float32)
    for s in range(SPLITS):
        mid = (b * HQ + heads) * SPLITS + s
        w = tl.exp2(tl.load(mid_m_ptr + mid, mask=hmask, other=float("-inf")) - m_safe)
        l_all += w * tl.load(mid_l_ptr + mid, mask=hmask, other=0.0)
        off = mid[:, None] * D + ch[None, :]
        acc_r += w[:, None] * tl.load(mid_ar_ptr + off, mask=hmask[:, None], other=0.0)
        acc_p += w[:, None] * tl.load(mid_ap_ptr + off, mask=hmask[:, None], other=0.0)
    h = tl.load(h_ptr + ch[:, None] * D + ch[None, :])
    l_all = tl.where(l_all > 0, l_all, 1.0)  # padded heads
    out = (tl.dot(acc_r, h, input_precision="ieee") + acc_p) / l_all[:, None]
    tl.store(out_ptr + (b * HQ + heads)[:, None] * D + ch[None, :], out, mask=hmask[:, None])


def default_splits(max_pages: int) -> int:
    """Splits for a page-table width: about 4 pages per split, at most 32 (shape-only)."""
    return max(1, min(32, -(-max_pages // 4)))


def decode_attention(
    q: torch.Tensor,
    cache: PagedKVCache,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    config: KVarNConfig,
    sm_scale: float,
    *,
    max_splits: int | None = None,
) -> torch.Tensor:
    """Decode attention (Triton twin of ``ref_decode_attention``).

    Args:
        q: ``[B, Hq, D]`` fp16/bf16/fp32, the current token of each request.
        cache: packed ``uint8 [P, Hkv, page_bytes]``, fp16 slots ``[S, G, Hkv, D]`` and
            ``page_slot int64 [P]``; a request's sink pages and own page must have slots.
        page_table: ``int32/int64 [B, max_pages]`` page ids per request.
        seq_lens: ``int32/int64 [B]``, >= 1, the current token included.
        max_splits: split-KV programs per (request, KV head); defaults to a function of
            ``max_pages`` only, so the grid never depends on the data.
    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    b, hq, d, hkv = check_paged_inputs(q, cache, page_table, config)
    if seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"Invalid shape of seq_lens: expected [{b}] int32/int64, got "
            f"{list(seq_lens.shape)} {seq_lens.dtype}"
        )
    splits = max_splits or default_splits(page_table.shape[1])
    group = hq // hkv
    block_h = max(16, triton.next_power_of_2(group))
    qf = q.float().contiguous()
    h = hadamard_matrix(d, q.device)
    qr = (qf @ h).contiguous()
    mid_m = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    mid_l = torch.empty_like(mid_m)
    mid_ar = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    mid_ap = torch.empty_like(mid_ar)
    packed, sk, sv = cache.packed, cache.slot_k, cache.slot_v
    _decode_split_kernel[(b, hkv, splits)](
        qf, qr, packed, packed.view(torch.float16), packed.stride(0), packed.stride(1),
        sk, sv, sk.stride(0), sk.stride(1), sk.stride(2),
        cache.page_slot, page_table, page_table.stride(0), seq_lens,
        mid_m, mid_l, mid_ar, mid_ap,
        sm_scale * LOG2E, config.sink_pages,
        *record_offsets(config.layout),
        HQ=hq, G=config.page_size, D=d, GROUP=group, BLOCK_H=block_h,
        K_BITS=config.k_bits, V_BITS=config.v_bits, SPLITS=splits,
        SLOT_DT=slot_operand_dtype(sk),
    )  # fmt: skip
    out = torch.empty(b, hq, d, dtype=torch.float32, device=q.device)
    _decode_merge_kernel[(b, hkv)](
        mid_m, mid_l, mid_ar, mid_ap, h, out,
        HQ=hq, D=d, GROUP=group, BLOCK_H=block_h, SPLITS=splits,
    )  # fmt: skip
    return out.to(q.dtype)
