"""Decode attention over KVarN pages: one query token per request, split-KV, two stages.

Sizes: stage 1 runs one program per (request, KV head, split), 2 warps; it serves all GROUP
query heads of the KV head at once, so every packed page is unpacked once per KV head. All
products are transposed: keys and channels are the rows of the tensor-core tiles, the GROUP
queries (padded to BLOCK_H >= 8) the narrow columns, so no tile row is padding. A split runs
its share of the request's packed pages, then its share of the fp16 pages:

* packed pages (``uint8 [num_pages, Hkv, page_bytes]``; every full page past the sinks),
  against the Hadamard-rotated query, codes turned into floats in place and the scales
  folded in (``page_tiles.packed_page_step``, KVARN_SPEC.md section 4):
  ``s_t = k_norm[t] * ((q * k_scale) . code_t + q . k_zero)`` and
  ``o += v_norm * (sum_t (p_t v_scale[t]) code_t + sum_t p_t v_zero[t])``;
* fp16 pages (``slot_k/slot_v [num_slots, G, Hkv, D]``: sink pages and the request's own,
  last page), against the plain query, in blocks of FP16_BLOCK keys.

The two kinds accumulate separately (rotated and plain domain, each as four channel quarters)
under one online softmax in the log2 domain. Stage 2 merges the splits with their
log-sum-exp and rotates the packed part back on tensor cores: ``out = (acc_rot @ H +
acc_plain) / l``. The grid depends only on shapes (``max_splits``), never on sequence
lengths, so the launch needs no host synchronisation and can be captured in a CUDA graph.

Reference: ``kvarn_sglang.quant.reference.ref_decode_attention``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.numerics import PagedKVCache, hadamard_matrix
from kvarn_sglang.kernels.codes import round_to
from kvarn_sglang.kernels.page_tiles import (
    fp16_page_step,
    load_value_quarters,
    packed_page_step,
    record_offsets,
    rescale_quarters,
    store_quarters,
    zero_quarters,
)
from kvarn_sglang.kernels.validate import (
    check_paged_inputs,
    compiled,
    dot_dtypes,
    hadamard_signs,
)

LOG2E = 1.4426950408889634
# Split-stage launch: 2 warps, 2 pipeline stages (registers: <= 197 at head_dim 256, no spills,
# >= 4 programs per SM; bench_kernel_static). An fp16 page is read in blocks of FP16_BLOCK keys.
SPLIT_WARPS = 2
SPLIT_STAGES = 2
FP16_BLOCK = 16


# Shape-dependent integers are runtime values Triton does not specialize on, so one compiled
# variant serves every batch, context and split count (``kernels.warmup`` compiles it at start).
@triton.jit(do_not_specialize=["stride_tb", "splits"])
def _decode_split_kernel(
    q_ptr, qr_ptr,  # [B, Hq, D] fp32 plain and rotated queries, contiguous
    pk_u8_ptr, pk_f16_ptr, stride_pp, stride_ph,  # packed records, strides in bytes
    sk_ptr, sv_ptr, stride_ss, stride_sg, stride_sh,  # fp16/bf16 slots [S, G, Hkv, D]
    page_slot_ptr, table_ptr, stride_tb, seq_lens_ptr,
    mid_m_ptr, mid_l_ptr, mid_ar_ptr, mid_ap_ptr,  # [B, Hq, S] and [B, Hq, S, D] fp32
    qk_scale, sink_pages, splits,
    kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    DT: tl.constexpr, OP: tl.constexpr, ASM: tl.constexpr, FB: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n = tl.load(seq_lens_ptr + b).to(tl.int32)
    own = (n - 1) // G
    sinks = tl.minimum(sink_pages, own)
    # Packed pages [sinks, own) and fp16 pages (sinks, then the own page) are each cut into
    # ``splits`` contiguous chunks; split s runs chunk s of both.
    per_split = tl.cdiv(own - sinks, splits)
    p_start = sinks + split * per_split
    p_end = tl.minimum(p_start + per_split, own)
    f_per = tl.cdiv(sinks + 1, splits)
    f_start = split * f_per
    f_end = tl.minimum(f_start + f_per, sinks + 1)

    Q: tl.constexpr = D // 4
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < GROUP
    heads = kvh * GROUP + hh
    ch = tl.arange(0, D)
    cq = tl.arange(0, Q)
    # Transposed: queries are columns ([channels, heads]), keys and channels rows.
    qt = qr_ptr + (b * HQ + heads)[None, :] * D + cq[:, None]
    qm = hmask[None, :]
    q0, q1, q2, q3 = load_value_quarters(qt, qm, Q)

    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    a0, a1, a2, a3 = zero_quarters(Q, BLOCK_H)
    for j in range(p_start, p_end):
        page = tl.load(table_ptr + b * stride_tb + j)
        if D > 128:  # re-read per page (L2) rather than held: registers at head_dim 256
            q0, q1, q2, q3 = load_value_quarters(qt, qm, Q, True)
        m_i, l_i, a0, a1, a2, a3 = packed_page_step(
            q0, q1, q2, q3, pk_u8_ptr, pk_f16_ptr, page * stride_pp + kvh * stride_ph,
            kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
            m_i, l_i, a0, a1, a2, a3, qk_scale, G, D, K_BITS, V_BITS, DT, OP, ASM, D > 128,
        )  # fmt: skip

    qp = tl.load(q_ptr + (b * HQ + heads)[None, :] * D + ch[:, None], mask=qm, other=0.0)
    qp = round_to(qp, DT, OP)
    c0, c1, c2, c3 = zero_quarters(Q, BLOCK_H)
    tb = tl.arange(0, FB)
    NB: tl.constexpr = G // FB
    for i in range(f_start * NB, f_end * NB):  # fp16 pages in blocks of FB tokens
        j = tl.where(i // NB < sinks, i // NB, own)
        page = tl.load(table_ptr + b * stride_tb + j)
        slot = tl.load(page_slot_ptr + page)
        t = (i % NB) * FB + tb
        valid = t < n - j * G
        kv_row = slot * stride_ss + t[:, None] * stride_sg + kvh * stride_sh
        k = tl.load(sk_ptr + kv_row + ch[None, :], mask=valid[:, None], other=0.0).to(OP)
        v0, v1, v2, v3 = load_value_quarters(sv_ptr + kv_row + cq[None, :], valid[:, None], Q)
        m_i, l_i, c0, c1, c2, c3, alpha = fp16_page_step(
            qp, k, v0.to(OP), v1.to(OP), v2.to(OP), v3.to(OP), valid[:, None],
            m_i, l_i, c0, c1, c2, c3, qk_scale, DT, OP,
        )  # fmt: skip
        a0, a1, a2, a3 = rescale_quarters(a0, a1, a2, a3, alpha)

    mid = (b * HQ + heads) * splits + split
    tl.store(mid_m_ptr + mid, m_i, mask=hmask)
    tl.store(mid_l_ptr + mid, l_i, mask=hmask)
    store_quarters(mid_ar_ptr + mid[None, :] * D + cq[:, None], a0, a1, a2, a3, qm, Q)
    store_quarters(mid_ap_ptr + mid[None, :] * D + cq[:, None], c0, c1, c2, c3, qm, Q)


@triton.jit(do_not_specialize=["splits"])
def _decode_merge_kernel(
    mid_m_ptr, mid_l_ptr, mid_ar_ptr, mid_ap_ptr,
    sign_ptr,  # [D, D] fp16 Hadamard signs (+1/-1)
    out_ptr, inv_sqrt_d, splits,
    HQ: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < GROUP
    heads = kvh * GROUP + hh
    ch = tl.arange(0, D)
    m_all = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    for s in range(splits):
        m_s = tl.load(mid_m_ptr + (b * HQ + heads) * splits + s, mask=hmask, other=float("-inf"))
        m_all = tl.maximum(m_all, m_s)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.zeros((BLOCK_H,), tl.float32)
    acc_r = tl.zeros((BLOCK_H, D), tl.float32)
    for s in range(splits):
        mid = (b * HQ + heads) * splits + s
        w = tl.exp2(tl.load(mid_m_ptr + mid, mask=hmask, other=float("-inf")) - m_safe)
        l_all += w * tl.load(mid_l_ptr + mid, mask=hmask, other=0.0)
        off = mid[:, None] * D + ch[None, :]
        acc_r += w[:, None] * tl.load(mid_ar_ptr + off, mask=hmask[:, None], other=0.0)
    l_all = tl.where(l_all > 0, l_all, 1.0)  # padded heads
    # Back-rotation on tensor cores, exact to ~2^-22: each row is scaled by a power of two
    # into fp16 range and split into two fp16 parts; the signs are exact in fp16.
    x = acc_r / l_all[:, None]
    top = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-30)
    scale = tl.exp2(14.0 + tl.floor(-tl.log2(top)))  # max |x * scale| in (2^13, 2^14]
    xs = x * scale[:, None]
    hi = xs.to(tl.float16)
    lo = (xs - hi.to(tl.float32)).to(tl.float16)
    unscale = inv_sqrt_d / scale
    nn = tl.arange(0, BLOCK_N)
    row = (b * HQ + heads)[:, None] * D
    for c in tl.static_range(D // BLOCK_N):
        col = c * BLOCK_N + nn
        sign = tl.load(sign_ptr + ch[:, None] * D + col[None, :])
        out = (tl.dot(hi, sign) + tl.dot(lo, sign)) * unscale[:, None]
        for s in range(splits):  # the plain part of these columns
            mid = (b * HQ + heads) * splits + s
            w = tl.exp2(tl.load(mid_m_ptr + mid, mask=hmask, other=float("-inf")) - m_safe)
            off = mid[:, None] * D + col[None, :]
            ap = tl.load(mid_ap_ptr + off, mask=hmask[:, None], other=0.0)
            out += (w / l_all)[:, None] * ap
        tl.store(out_ptr + row + col[None, :], out, mask=hmask[:, None])


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
    b = check_paged_inputs(q, cache, page_table, config)[0]
    if seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"Invalid shape of seq_lens: expected [{b}] int32/int64, got "
            f"{list(seq_lens.shape)} {seq_lens.dtype}"
        )
    splits = max_splits or default_splits(page_table.shape[1])
    return _launch(q, cache, page_table, seq_lens, config, sm_scale, splits, cache.slot_k.dtype)


def _launch(q, cache, page_table, seq_lens, config, sm_scale, splits, model_dtype):
    """Both stages, inputs unchecked. The slots may hold any dtype Triton converts to
    ``model_dtype`` (fp16/bf16), which benchmarks use for an fp8 paged baseline of identical
    structure (every page in the fp16-page path)."""
    b, hq, d = q.shape
    hkv = cache.packed.shape[1]
    group = hq // hkv
    block_h = max(8, triton.next_power_of_2(group))
    qf = q.float().contiguous()
    h = hadamard_matrix(d, q.device)
    qr = (qf @ h).contiguous()
    mid_m = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    mid_l = torch.empty_like(mid_m)
    mid_ar = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    mid_ap = torch.empty_like(mid_ar)
    packed, sk, sv = cache.packed, cache.slot_k, cache.slot_v
    dt, op = dot_dtypes(model_dtype, _decode_split_kernel)
    _decode_split_kernel[(b, hkv, splits)](
        qf, qr, packed, packed.view(torch.float16), packed.stride(0), packed.stride(1),
        sk, sv, sk.stride(0), sk.stride(1), sk.stride(2),
        cache.page_slot, page_table, page_table.stride(0), seq_lens,
        mid_m, mid_l, mid_ar, mid_ap,
        sm_scale * LOG2E, config.sink_pages, splits,
        *record_offsets(config.layout),
        HQ=hq, G=config.page_size, D=d, GROUP=group, BLOCK_H=block_h,
        K_BITS=config.k_bits, V_BITS=config.v_bits,
        DT=dt, OP=op, ASM=compiled(_decode_split_kernel), FB=FP16_BLOCK,
        num_warps=SPLIT_WARPS, num_stages=SPLIT_STAGES,
    )  # fmt: skip
    out = torch.empty(b, hq, d, dtype=torch.float32, device=q.device)
    _decode_merge_kernel[(b, hkv)](
        mid_m, mid_l, mid_ar, mid_ap, hadamard_signs(d, q.device), out, d**-0.5, splits,
        HQ=hq, D=d, GROUP=group, BLOCK_H=block_h, BLOCK_N=min(d, 64),
        num_warps=4,
    )  # fmt: skip
    return out.to(q.dtype)
