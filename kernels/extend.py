"""Extend attention (prefill, chunked prefill, prefix-cache hits), decode-consistent.

Sizes: the new tokens are cut into blocks of at most ``block_rows(D)`` (16, or 8 at head_dim
256: registers) within one page; one program (4 warps) serves one block and one query head,
so its queries share the same own page. Products are transposed as in ``decode.py`` (queries
are the columns). A program

1. streams every packed page before its own page, as a later token reads it, against the
   rotated query with scales folded in (``page_tiles.packed_page_step``); these pages must
   already be committed, including pages that became full in this same extend;
2. reads the sink pages from their fp16 slots and then its own page, causally, in blocks of
   FP16_BLOCK keys: positions before the request's prefix length from the page's fp16 slot,
   newer positions from ``k_new/v_new``.

One online softmax (log2 domain) covers both; the packed part accumulates in the rotated
domain and is rotated back on tensor cores at the end, ``out = (acc_rot @ H + acc_plain) / l``.
Block metadata is built on the host from the extend lengths (one host sync, as SGLang's own
extend does).

Reference: ``kvarn_sglang.quant.reference.ref_extend_attention``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.numerics import PagedKVCache, hadamard_matrix
from kvarn_sglang.kernels.codes import round_to
from kvarn_sglang.kernels.decode import FP16_BLOCK, LOG2E
from kvarn_sglang.kernels.page_tiles import (
    fp16_page_step,
    load_value_quarters,
    packed_page_step,
    record_offsets,
    rescale_quarters,
    rotate_back,
    zero_quarters,
)
from kvarn_sglang.kernels.validate import (
    INDEX_DTYPES,
    check_paged_inputs,
    compiled,
    dot_dtypes,
    hadamard_signs,
)


@triton.jit
def _sum(a, b, DT: tl.constexpr, OP: tl.constexpr):
    """a + b rounded to DT (exact when one of them is zero), held as OP."""
    return round_to(a.to(tl.float32) + b.to(tl.float32), DT, OP)


@triton.jit
def _extend_kernel(
    q_ptr, qr_ptr,  # [T, Hq, D] fp32, contiguous
    kn_ptr, vn_ptr, stride_nt, stride_nh,  # new K/V [T, Hkv, D]
    pk_u8_ptr, pk_f16_ptr, stride_pp, stride_ph,
    sk_ptr, sv_ptr, stride_ss, stride_sg, stride_sh,
    page_slot_ptr, table_ptr, stride_tb,
    blk_ptr,  # [num_blocks, 5] int64: request, page index, first query position, prefix, end
    row0_ptr,  # [B] int64: row of each request's first new token
    sign_ptr, out_ptr,  # Hadamard signs fp16 [D, D]; out [T, Hq, D] fp32
    qk_scale, inv_sqrt_d, sink_pages, window_left,
    kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, BM: tl.constexpr, FB: tl.constexpr,
    DT: tl.constexpr, OP: tl.constexpr, ASM: tl.constexpr, WINDOW: tl.constexpr = False,
):  # fmt: skip
    blk = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // GROUP
    b = tl.load(blk_ptr + blk * 5)
    j = tl.load(blk_ptr + blk * 5 + 1)
    pos0 = tl.load(blk_ptr + blk * 5 + 2)
    pre = tl.load(blk_ptr + blk * 5 + 3)
    end = tl.load(blk_ptr + blk * 5 + 4)
    row0 = tl.load(row0_ptr + b)

    Q: tl.constexpr = D // 4
    r = tl.arange(0, BM)
    ch = tl.arange(0, D)
    cq = tl.arange(0, Q)
    q_pos = pos0 + r
    q_valid = q_pos < tl.minimum(end, (j + 1) * G)
    q_rows = row0 + q_pos - pre
    # Transposed: the block's queries are columns ([channels, queries]).
    qt = qr_ptr + (q_rows * HQ + head)[None, :] * D + cq[:, None]
    qm = q_valid[None, :]
    q0, q1, q2, q3 = load_value_quarters(qt, qm, Q)

    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    a0, a1, a2, a3 = zero_quarters(Q, BM)
    sinks = tl.minimum(sink_pages, j)
    # A sliding window (WINDOW): query q reads keys >= q - window_left; pages wholly before
    # the block's first query's window are not read.
    key_lo = q_pos - window_left
    if WINDOW:
        p_lo = tl.maximum(sinks, tl.maximum(pos0 - window_left, 0) // G)
        f_lo = tl.minimum(tl.maximum(pos0 - window_left, 0) // G, sinks)
    else:  # the windowless kernel compiles exactly as before
        p_lo = sinks
        f_lo = 0
    for jj in range(p_lo, j):  # earlier pages, packed
        page = tl.load(table_ptr + b * stride_tb + jj)
        m_i, l_i, a0, a1, a2, a3 = packed_page_step(
            q0, q1, q2, q3, pk_u8_ptr, pk_f16_ptr, page * stride_pp + kvh * stride_ph,
            kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
            m_i, l_i, a0, a1, a2, a3, qk_scale, G, D, K_BITS, V_BITS, DT, OP, ASM, D > 128,
            key_lo - jj * G, WINDOW,
        )  # fmt: skip

    qp = tl.load(q_ptr + (q_rows * HQ + head)[None, :] * D + ch[:, None], mask=qm, other=0.0)
    qp = round_to(qp, DT, OP)
    c0, c1, c2, c3 = zero_quarters(Q, BM)
    tb = tl.arange(0, FB)
    NB: tl.constexpr = G // FB
    own_slot = tl.load(page_slot_ptr + tl.load(table_ptr + b * stride_tb + j))
    # Blocks of FB keys: the sink pages (fp16 slots), then the own page, causally: positions
    # before the prefix length from its slot, newer ones from k_new/v_new. Block 0 of the own
    # page holds a key every query sees, so no query's maximum stays -inf.
    for i in range(f_lo * NB, (sinks + 1) * NB):
        if i < sinks * NB:
            jj = i // NB
            slot = tl.load(page_slot_ptr + tl.load(table_ptr + b * stride_tb + jj))
        else:
            jj = j
            slot = own_slot
        k_pos = jj * G + (i % NB) * FB + tb
        from_slot = (jj < j) | (k_pos < pre)
        from_new = (jj == j) & (k_pos >= pre) & (k_pos < end)
        s_row = slot * stride_ss + (k_pos - jj * G)[:, None] * stride_sg + kvh * stride_sh
        n_row = (row0 + k_pos - pre)[:, None] * stride_nt + kvh * stride_nh
        k = tl.load(sk_ptr + s_row + ch[None, :], mask=from_slot[:, None], other=0.0).to(tl.float32)
        k += tl.load(kn_ptr + n_row + ch[None, :], mask=from_new[:, None], other=0.0).to(tl.float32)
        causal = (k_pos[:, None] <= q_pos[None, :]) & (from_slot | from_new)[:, None]
        if WINDOW:
            causal = causal & (k_pos[:, None] >= key_lo[None, :])
        # Each position comes from one source; the other load is masked to zero.
        v0, v1, v2, v3 = load_value_quarters(sv_ptr + s_row + cq[None, :], from_slot[:, None], Q)
        w0, w1, w2, w3 = load_value_quarters(vn_ptr + n_row + cq[None, :], from_new[:, None], Q)
        m_i, l_i, c0, c1, c2, c3, alpha = fp16_page_step(
            qp, round_to(k, DT, OP), _sum(v0, w0, DT, OP), _sum(v1, w1, DT, OP),
            _sum(v2, w2, DT, OP), _sum(v3, w3, DT, OP), causal, m_i, l_i, c0, c1, c2, c3,
            qk_scale, DT, OP, WINDOW,
        )  # fmt: skip
        a0, a1, a2, a3 = rescale_quarters(a0, a1, a2, a3, alpha)

    out = out_ptr + (q_rows * HQ + head)[None, :] * D + cq[:, None]
    l_i = tl.where(l_i > 0, l_i, 1.0)
    o = rotate_back(a0, a1, a2, a3, sign_ptr, l_i, inv_sqrt_d, 0, D) + c0 / l_i[None, :]
    tl.store(out, o, mask=qm)
    o = rotate_back(a0, a1, a2, a3, sign_ptr, l_i, inv_sqrt_d, 1, D) + c1 / l_i[None, :]
    tl.store(out + Q, o, mask=qm)
    o = rotate_back(a0, a1, a2, a3, sign_ptr, l_i, inv_sqrt_d, 2, D) + c2 / l_i[None, :]
    tl.store(out + 2 * Q, o, mask=qm)
    o = rotate_back(a0, a1, a2, a3, sign_ptr, l_i, inv_sqrt_d, 3, D) + c3 / l_i[None, :]
    tl.store(out + 3 * Q, o, mask=qm)


def _blocks(
    prefix: list[int], extend: list[int], g: int, bm: int
) -> list[tuple[int, int, int, int, int]]:
    """(request, page index, first query position, prefix length, end) per block: the new
    tokens of a request cut at page boundaries, then into runs of at most ``bm``."""
    out = []
    for b, (pre, ext) in enumerate(zip(prefix, extend, strict=True)):
        end = pre + ext
        for j in range(pre // g, (end - 1) // g + 1 if ext else pre // g):
            lo, hi = max(pre, j * g), min(end, (j + 1) * g)
            out += [(b, j, p, pre, end) for p in range(lo, hi, bm)]
    return out


def block_rows(d: int) -> int:
    """Queries per extend program: as many as registers allow without spilling."""
    return 16 if d <= 128 else 8


def extend_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: PagedKVCache,
    page_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    config: KVarNConfig,
    sm_scale: float,
    *,
    window_left: int | None = None,
) -> torch.Tensor:
    """Decode-consistent extend attention (Triton twin of ``ref_extend_attention``).

    Args:
        q: ``[T, Hq, D]`` new tokens of all requests, concatenated in request order.
        k_new, v_new: ``[T, Hkv, D]`` their post-RoPE K and V (head_dim contiguous).
        cache: the paged store; pages that became full in this extend must be committed, a
            partial prefix page and the sink pages must have fp16 slots.
        page_table: ``int [B, max_pages]``; prefix_lens, extend_lens: ``int [B]``.
        window_left: a sliding window: a query at p reads keys ``>= p - window_left`` only
            (``LayerAttention.window_left``; compiled as its own variant). None: full.
    Returns:
        ``[T, Hq, D]`` in q's dtype.
    """
    if window_left is not None and window_left < 0:
        raise ValueError(f"Unsupported window_left {window_left}: expected >= 0 or None")
    t, hq, d, hkv = check_paged_inputs(q, cache, page_table, config)
    b = page_table.shape[0]
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if tuple(x.shape) != (t, hkv, d):
            raise ValueError(
                f"Invalid shape of {name}: expected [{t}, {hkv}, {d}], got {list(x.shape)}"
            )
        if x.stride(2) != 1 or x.device != q.device:
            raise ValueError(
                f"Invalid stride of {name}: head_dim must be contiguous, on {q.device}"
            )
    if k_new.stride() != v_new.stride():
        raise ValueError("Invalid stride of v_new: expected the strides of k_new")
    for name, x in (("prefix_lens", prefix_lens), ("extend_lens", extend_lens)):
        if x.shape != (b,) or x.dtype not in INDEX_DTYPES:
            got = f"{list(x.shape)} {x.dtype}"
            raise ValueError(f"Invalid shape of {name}: expected [{b}] int32/int64, got {got}")
    prefix, extend = prefix_lens.tolist(), extend_lens.tolist()
    if sum(extend) != t:
        raise ValueError(f"Invalid extend_lens: they sum to {sum(extend)}, q has {t} tokens")
    g = config.page_size
    blocks = _blocks(prefix, extend, g, block_rows(d))
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=q.device)
    if not blocks:
        return out.to(q.dtype)
    blk = torch.tensor(blocks, dtype=torch.int64, device=q.device)
    row0 = torch.tensor([0, *extend[:-1]], device=q.device).cumsum(0)
    qf = q.float().contiguous()
    h = hadamard_matrix(d, q.device)
    qr = (qf @ h).contiguous()
    packed, sk, sv = cache.packed, cache.slot_k, cache.slot_v
    dt, op = dot_dtypes(sk.dtype, _extend_kernel)
    _extend_kernel[(len(blocks), hq)](
        qf, qr, k_new, v_new, k_new.stride(0), k_new.stride(1),
        packed, packed.view(torch.float16), packed.stride(0), packed.stride(1),
        sk, sv, sk.stride(0), sk.stride(1), sk.stride(2),
        cache.page_slot, page_table, page_table.stride(0),
        blk, row0, hadamard_signs(d, q.device), out,
        sm_scale * LOG2E, d**-0.5, config.sink_pages, window_left or 0,
        *record_offsets(config.layout),
        HQ=hq, G=g, D=d, GROUP=hq // hkv, K_BITS=config.k_bits, V_BITS=config.v_bits,
        BM=block_rows(d), FB=FP16_BLOCK, DT=dt, OP=op, ASM=compiled(_extend_kernel),
        WINDOW=window_left is not None, num_warps=4, num_stages=2,
    )  # fmt: skip
    return out.to(q.dtype)
