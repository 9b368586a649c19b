"""Extend attention (prefill, chunked prefill, prefix-cache hits), decode-consistent.

Sizes: the new tokens are cut into blocks within one page; one program serves one block and
one KV head, with every query head of the KV head: its ``BM`` rows are (token, query head)
pairs, ``BM // GROUP`` tokens of GROUP heads each (``tokens_per_block``), stacked in the
tensor-core M dimension as SGLang's and FlashAttention's prefill kernels stack rows, so every
packed page is unpacked once per program for all of them. A program

1. streams every packed page before its own page, as a later token reads it, in sub-blocks
   of KB keys: the codes become floats in place (``kernels.codes``), are dequantized in the
   dot's dtype (``K = (code * k_scale + k_zero)``, its per-token norm folded into the
   scores; ``V = (code * v_scale + v_zero) * v_norm``) and meet the Hadamard-rotated queries
   on tensor cores; these pages must already be committed, including pages that became full
   in this same extend;
2. rotates its accumulator back to the model's domain once (on tensor cores, exact to
   ~2^-22), then reads the sink pages from their fp16 slots and its own page, causally, in
   blocks of FB keys: positions before the request's prefix length from the page's fp16 slot,
   newer positions from ``k_new/v_new``.

One online softmax (log2 domain) covers both. Block metadata (``ExtendBlocks``) is built on
the host from host lengths, once per forward pass (``extend_blocks``), never per layer.

Reference: ``kvarn_sglang.quant.reference.ref_extend_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.numerics import PagedKVCache, hadamard_matrix
from kvarn_sglang.kernels.codes import load_quarters, quarter_magic, round_to
from kvarn_sglang.kernels.decode import LOG2E
from kvarn_sglang.kernels.page_tiles import record_offsets
from kvarn_sglang.kernels.validate import (
    INDEX_DTYPES,
    check_paged_inputs,
    compiled,
    dot_dtypes,
    hadamard_signs,
)

# Keys per step: KB of a packed page, FB of an fp16 page (both divide every page size).
PACKED_KEYS = 64
FP16_KEYS = 64


@triton.jit
def _dequant(x, magic, scale, zero, DT: tl.constexpr, OP: tl.constexpr):
    """``(x - magic) * scale + zero`` rounded to DT, held as OP; ``x - magic`` is the code,
    exact; scale and zero broadcast along the tile."""
    return round_to((x - magic) * scale + zero, DT, OP)


@triton.jit
def _packed_keys(
    qr0, qr1, qr2, qr3, u8_ptr, f16_ptr, rec, r16, t0,
    kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
    ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, vn0, vn1, vn2, vn3,
    m_i, l_i, a0, a1, a2, a3, qk_scale,
    G: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, K_BITS: tl.constexpr,
    V_BITS: tl.constexpr, DT: tl.constexpr, OP: tl.constexpr, ASM: tl.constexpr,
    RELOAD: tl.constexpr,
):  # fmt: skip
    """Keys t0..t0+KB of the packed page record at byte ``rec``: rotated queries ``qr_i [BM,
    Q]``, accumulators ``a_i [BM, Q]`` (rotated domain), softmax state ``m_i, l_i [BM]``.
    With ``RELOAD`` the per-channel metadata is re-read here (L1) rather than held."""
    Q: tl.constexpr = D // 4
    if RELOAD:
        ks0, ks1, ks2, ks3 = _load_quarter_vec(f16_ptr + r16 + ks_off // 2, Q, OP, True)
        kz0, kz1, kz2, kz3 = _load_quarter_vec(f16_ptr + r16 + kz_off // 2, Q, OP, True)
        vn0, vn1, vn2, vn3 = _load_quarter_vec(f16_ptr + r16 + vn_off // 2, Q, OP, True)
    tok = t0 + tl.arange(0, KB)
    cq = tl.arange(0, Q)
    # K codes [G, D * K_BITS / 8] by token: quarter tiles [KB, Q], channels contiguous.
    k_offs = tok[:, None] * (D * K_BITS // 8) + cq[None, :]
    k0, k1, k2, k3 = load_quarters(u8_ptr + rec + kc_off, k_offs, Q, K_BITS, DT, OP, ASM)
    k0 = _dequant(k0, quarter_magic(0, K_BITS, DT), ks0[None, :], kz0[None, :], DT, OP)
    s = tl.dot(qr0, tl.trans(k0))
    k1 = _dequant(k1, quarter_magic(1, K_BITS, DT), ks1[None, :], kz1[None, :], DT, OP)
    s = tl.dot(qr1, tl.trans(k1), s)
    k2 = _dequant(k2, quarter_magic(2, K_BITS, DT), ks2[None, :], kz2[None, :], DT, OP)
    s = tl.dot(qr2, tl.trans(k2), s)
    k3 = _dequant(k3, quarter_magic(3, K_BITS, DT), ks3[None, :], kz3[None, :], DT, OP)
    s = tl.dot(qr3, tl.trans(k3), s)
    s = s * (tl.load(f16_ptr + r16 + kn_off // 2 + tok).to(tl.float32) * qk_scale)[None, :]
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = round_to(p, DT, OP)
    # V codes [D * V_BITS / 8, G] by channel slot: quarter tiles [Q, KB], tokens contiguous.
    v_offs = cq[:, None] * G + tok[None, :]
    v0, v1, v2, v3 = load_quarters(u8_ptr + rec + vc_off, v_offs, Q * G, V_BITS, DT, OP, ASM)
    vs = tl.load(f16_ptr + r16 + vs_off // 2 + tok).to(OP)[None, :]
    vz = tl.load(f16_ptr + r16 + vz_off // 2 + tok).to(OP)[None, :]
    v0 = _dequant(v0, quarter_magic(0, V_BITS, DT), vs, vz, DT, OP)
    a0 = tl.dot(p, tl.trans(_dequant(v0, 0.0, vn0[:, None], 0.0, DT, OP)), a0 * alpha[:, None])
    v1 = _dequant(v1, quarter_magic(1, V_BITS, DT), vs, vz, DT, OP)
    a1 = tl.dot(p, tl.trans(_dequant(v1, 0.0, vn1[:, None], 0.0, DT, OP)), a1 * alpha[:, None])
    v2 = _dequant(v2, quarter_magic(2, V_BITS, DT), vs, vz, DT, OP)
    a2 = tl.dot(p, tl.trans(_dequant(v2, 0.0, vn2[:, None], 0.0, DT, OP)), a2 * alpha[:, None])
    v3 = _dequant(v3, quarter_magic(3, V_BITS, DT), vs, vz, DT, OP)
    a3 = tl.dot(p, tl.trans(_dequant(v3, 0.0, vn3[:, None], 0.0, DT, OP)), a3 * alpha[:, None])
    return m_new, l_i, a0, a1, a2, a3


@triton.jit
def _load_quarter_vec(ptr, Q: tl.constexpr, OP: tl.constexpr, VOLATILE: tl.constexpr = False):
    """The four channel quarters ``[Q]`` of an fp16 vector at ``ptr``, as OP."""
    cq = tl.arange(0, Q)
    return (
        tl.load(ptr + cq, volatile=VOLATILE).to(OP),
        tl.load(ptr + Q + cq, volatile=VOLATILE).to(OP),
        tl.load(ptr + 2 * Q + cq, volatile=VOLATILE).to(OP),
        tl.load(ptr + 3 * Q + cq, volatile=VOLATILE).to(OP),
    )


@triton.jit
def packed_page_rows(
    qr0, qr1, qr2, qr3, u8_ptr, f16_ptr, rec,
    kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
    m_i, l_i, a0, a1, a2, a3, qk_scale,
    G: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, K_BITS: tl.constexpr,
    V_BITS: tl.constexpr, DT: tl.constexpr, OP: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """Attend the BM rows (rotated queries ``qr_i [BM, Q]``) to one packed page."""
    Q: tl.constexpr = D // 4
    r16 = rec // 2
    RELOAD: tl.constexpr = D > 128  # registers
    ks0, ks1, ks2, ks3 = _load_quarter_vec(f16_ptr + r16 + ks_off // 2, Q, OP)
    kz0, kz1, kz2, kz3 = _load_quarter_vec(f16_ptr + r16 + kz_off // 2, Q, OP)
    vn0, vn1, vn2, vn3 = _load_quarter_vec(f16_ptr + r16 + vn_off // 2, Q, OP)
    for t in tl.static_range(G // KB):
        m_i, l_i, a0, a1, a2, a3 = _packed_keys(
            qr0, qr1, qr2, qr3, u8_ptr, f16_ptr, rec, r16, t * KB,
            kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
            ks0, ks1, ks2, ks3, kz0, kz1, kz2, kz3, vn0, vn1, vn2, vn3,
            m_i, l_i, a0, a1, a2, a3, qk_scale, G, D, KB, K_BITS, V_BITS, DT, OP, ASM, RELOAD,
        )  # fmt: skip
    return m_i, l_i, a0, a1, a2, a3


@triton.jit
def _rotate_quarter(a0, a1, a2, a3, sign_ptr, IDX: tl.constexpr, D: tl.constexpr):
    """Channel quarter IDX of ``a @ S`` (S the Hadamard signs ``[D, D]``, symmetric) for rows
    ``a_i [BM, Q]`` already scaled into fp16 range: each split into two fp16 parts, so the
    product is exact to ~2^-22 on tensor cores."""
    Q: tl.constexpr = D // 4
    rows = tl.arange(0, Q)
    cols = IDX * Q + tl.arange(0, Q)
    out = tl.zeros((a0.shape[0], Q), tl.float32)
    for i in tl.static_range(4):
        if i == 0:
            x = a0
        elif i == 1:
            x = a1
        elif i == 2:
            x = a2
        else:
            x = a3
        hi = x.to(tl.float16)
        lo = (x - hi.to(tl.float32)).to(tl.float16)
        sign = tl.load(sign_ptr + (i * Q + rows)[:, None] * D + cols[None, :])
        out = tl.dot(hi, sign, out)
        out = tl.dot(lo, sign, out)
    return out


@triton.jit
def rotate_rows_back(a0, a1, a2, a3, sign_ptr, inv_sqrt_d, D: tl.constexpr):
    """``a @ H`` for rotated accumulators ``a_i [BM, Q]`` (rows are queries)."""
    top = tl.maximum(tl.max(tl.abs(a0), axis=1), tl.max(tl.abs(a1), axis=1))
    top = tl.maximum(top, tl.maximum(tl.max(tl.abs(a2), axis=1), tl.max(tl.abs(a3), axis=1)))
    scale = tl.exp2(14.0 + tl.floor(-tl.log2(tl.maximum(top, 1e-30))))  # max in (2^13, 2^14]
    a0 = a0 * scale[:, None]
    a1 = a1 * scale[:, None]
    a2 = a2 * scale[:, None]
    a3 = a3 * scale[:, None]
    unscale = (inv_sqrt_d / scale)[:, None]
    return (
        _rotate_quarter(a0, a1, a2, a3, sign_ptr, 0, D) * unscale,
        _rotate_quarter(a0, a1, a2, a3, sign_ptr, 1, D) * unscale,
        _rotate_quarter(a0, a1, a2, a3, sign_ptr, 2, D) * unscale,
        _rotate_quarter(a0, a1, a2, a3, sign_ptr, 3, D) * unscale,
    )


# The page table's width varies from pass to pass: not specialized on (one compiled variant).
@triton.jit(do_not_specialize=["stride_tb"])
def _extend_kernel(
    q_ptr, qr_ptr,  # [T, Hq, D] fp32, contiguous
    kn_ptr, vn_ptr, stride_nt, stride_nh,  # new K/V [T, Hkv, D]
    pk_u8_ptr, pk_f16_ptr, stride_pp, stride_ph,
    sk_ptr, sv_ptr, stride_ss, stride_sg, stride_sh,
    page_slot_ptr, table_ptr, stride_tb,
    blk_ptr,  # [num_blocks, 5] int32: request, page index, first query position, prefix, end
    row0_ptr,  # [B] int32: row of each request's first new token
    sign_ptr, out_ptr,  # Hadamard signs fp16 [D, D]; out [T, Hq, D]
    qk_scale, inv_sqrt_d, sink_pages,
    kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, BM: tl.constexpr, TOK: tl.constexpr,
    KB: tl.constexpr, FB: tl.constexpr, DT: tl.constexpr, OP: tl.constexpr,
    ASM: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.load(blk_ptr + blk * 5)
    j = tl.load(blk_ptr + blk * 5 + 1)
    pos0 = tl.load(blk_ptr + blk * 5 + 2)
    pre = tl.load(blk_ptr + blk * 5 + 3)
    end = tl.load(blk_ptr + blk * 5 + 4)
    row0 = tl.load(row0_ptr + b)

    Q: tl.constexpr = D // 4
    r = tl.arange(0, BM)
    tok = r // GROUP
    q_pos = pos0 + tok
    q_valid = (tok < TOK) & (q_pos < tl.minimum(end, (j + 1) * G))
    q_row = ((row0 + q_pos - pre) * HQ + kvh * GROUP + r % GROUP).to(tl.int64) * D
    cq = tl.arange(0, Q)
    qm = q_valid[:, None]
    qr0 = round_to(tl.load(qr_ptr + q_row[:, None] + cq[None, :], mask=qm, other=0.0), DT, OP)
    qr1 = round_to(tl.load(qr_ptr + q_row[:, None] + Q + cq[None, :], mask=qm, other=0.0), DT, OP)
    qr2 = round_to(
        tl.load(qr_ptr + q_row[:, None] + 2 * Q + cq[None, :], mask=qm, other=0.0), DT, OP
    )
    qr3 = round_to(
        tl.load(qr_ptr + q_row[:, None] + 3 * Q + cq[None, :], mask=qm, other=0.0), DT, OP
    )

    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    a0 = tl.zeros((BM, Q), tl.float32)
    a1 = tl.zeros((BM, Q), tl.float32)
    a2 = tl.zeros((BM, Q), tl.float32)
    a3 = tl.zeros((BM, Q), tl.float32)
    sinks = tl.minimum(sink_pages, j)
    for jj in range(sinks, j):  # earlier pages, packed
        page = tl.load(table_ptr + b * stride_tb + jj)
        m_i, l_i, a0, a1, a2, a3 = packed_page_rows(
            qr0, qr1, qr2, qr3, pk_u8_ptr, pk_f16_ptr, page * stride_pp + kvh * stride_ph,
            kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
            m_i, l_i, a0, a1, a2, a3, qk_scale, G, D, KB, K_BITS, V_BITS, DT, OP, ASM,
        )  # fmt: skip
    if j > sinks:
        a0, a1, a2, a3 = rotate_rows_back(a0, a1, a2, a3, sign_ptr, inv_sqrt_d, D)
    ch = tl.arange(0, D)
    qp = round_to(tl.load(q_ptr + q_row[:, None] + ch[None, :], mask=qm, other=0.0), DT, OP)
    tb = tl.arange(0, FB)
    NB: tl.constexpr = G // FB
    own_slot = tl.load(page_slot_ptr + tl.load(table_ptr + b * stride_tb + j))
    last = tl.minimum(pos0 + TOK, tl.minimum(end, (j + 1) * G)) - 1  # the block's last query
    # Blocks of FB keys: the sink pages (fp16 slots), then the own page up to the block's last
    # query, causally: positions before the prefix length from its slot, newer ones from
    # k_new/v_new. Block 0 of the own page holds a key every query sees, so no query's
    # maximum stays -inf.
    for i in range(sinks * NB + (last - j * G) // FB + 1):
        if i < sinks * NB:
            jj = i // NB
            kb = i % NB
            slot = tl.load(page_slot_ptr + tl.load(table_ptr + b * stride_tb + jj))
        else:
            jj = j
            kb = i - sinks * NB
            slot = own_slot
        k_pos = jj * G + kb * FB + tb
        from_slot = (jj < j) | (k_pos < pre)
        from_new = (jj == j) & (k_pos >= pre) & (k_pos < end)
        s_row = slot * stride_ss + (k_pos - jj * G)[:, None] * stride_sg + kvh * stride_sh
        n_row = (row0 + k_pos - pre)[:, None] * stride_nt + kvh * stride_nh
        k = tl.load(sk_ptr + s_row + ch[None, :], mask=from_slot[:, None], other=0.0)
        k += tl.load(kn_ptr + n_row + ch[None, :], mask=from_new[:, None], other=0.0)
        s = tl.dot(qp, tl.trans(k.to(OP))) * qk_scale
        causal = (k_pos[None, :] <= q_pos[:, None]) & (from_slot | from_new)[None, :]
        s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        p = round_to(p, DT, OP)
        sv = sv_ptr + s_row + cq[None, :]
        nv = vn_ptr + n_row + cq[None, :]
        fs = from_slot[:, None]
        fn = from_new[:, None]
        v = tl.load(sv, mask=fs, other=0.0) + tl.load(nv, mask=fn, other=0.0)
        a0 = tl.dot(p, v.to(OP), a0 * alpha[:, None])
        v = tl.load(sv + Q, mask=fs, other=0.0) + tl.load(nv + Q, mask=fn, other=0.0)
        a1 = tl.dot(p, v.to(OP), a1 * alpha[:, None])
        v = tl.load(sv + 2 * Q, mask=fs, other=0.0) + tl.load(nv + 2 * Q, mask=fn, other=0.0)
        a2 = tl.dot(p, v.to(OP), a2 * alpha[:, None])
        v = tl.load(sv + 3 * Q, mask=fs, other=0.0) + tl.load(nv + 3 * Q, mask=fn, other=0.0)
        a3 = tl.dot(p, v.to(OP), a3 * alpha[:, None])

    l_i = tl.where(l_i > 0, l_i, 1.0)[:, None]
    out = out_ptr + q_row[:, None] + cq[None, :]
    tl.store(out, a0 / l_i, mask=qm)
    tl.store(out + Q, a1 / l_i, mask=qm)
    tl.store(out + 2 * Q, a2 / l_i, mask=qm)
    tl.store(out + 3 * Q, a3 / l_i, mask=qm)


@dataclass(frozen=True)
class ExtendBlocks:
    """The blocks of one extend pass for one (head_dim, GQA ratio): ``blocks int32 [N, 5]``
    (request, page index, first query position, prefix length, end) and ``row0 int32 [B]``
    (row of each request's first new token), on the device; ``count`` on the host."""

    blocks: torch.Tensor
    row0: torch.Tensor
    count: int
    tokens: int


def key_blocks(d: int, page_size: int) -> tuple[int, int]:
    """Keys per step of an extend program: ``(KB, FB)``, of a packed and of an fp16 page."""
    kb = 128 if d <= 64 else PACKED_KEYS
    return min(kb, page_size), min(FP16_KEYS, page_size)


def block_shape(d: int, group: int, page_size: int) -> tuple[int, int, int]:
    """``(rows, tokens, warps)`` of an extend program: BM rows of (token, query head) pairs,
    as many whole tokens of the GQA group as fit (at most a page), and its warps."""
    rows = 128 if d <= 128 else 64
    rows = max(rows, triton.next_power_of_2(group))
    tokens = max(1, min(page_size, rows // group))
    return rows, tokens, 8


def _blocks(prefix: list[int], extend: list[int], g: int, tok: int) -> list[tuple[int, ...]]:
    """(request, page index, first query position, prefix length, end) per block: the new
    tokens of a request cut at page boundaries, then into runs of at most ``tok``."""
    out = []
    for b, (pre, ext) in enumerate(zip(prefix, extend, strict=True)):
        end = pre + ext
        for j in range(pre // g, (end - 1) // g + 1 if ext else pre // g):
            lo, hi = max(pre, j * g), min(end, (j + 1) * g)
            out += [(b, j, p, pre, end) for p in range(lo, hi, tok)]
    return out


def extend_blocks(
    prefix: list[int], extend: list[int], config: KVarNConfig, group: int, device
) -> ExtendBlocks:
    """Plan an extend pass from host lengths: one host-to-device copy, no synchronisation."""
    tok = block_shape(config.head_dim, group, config.page_size)[1]
    blocks = _blocks(prefix, extend, config.page_size, tok)
    row0 = [0]
    for e in extend[:-1]:
        row0.append(row0[-1] + e)
    n = -(-5 * len(blocks) // 4) * 4  # row0 starts 16-byte aligned, as Triton specializes
    flat = [x for blk in blocks for x in blk]
    flat += [0] * (n - len(flat)) + row0
    dev = torch.tensor(flat, dtype=torch.int32).to(device, non_blocking=True)
    return ExtendBlocks(dev[: 5 * len(blocks)].view(-1, 5), dev[n:], len(blocks), sum(extend))


def extend_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: PagedKVCache,
    page_table: torch.Tensor,
    prefix_lens: torch.Tensor | list[int],
    extend_lens: torch.Tensor | list[int],
    config: KVarNConfig,
    sm_scale: float,
    *,
    blocks: ExtendBlocks | None = None,
) -> torch.Tensor:
    """Decode-consistent extend attention (Triton twin of ``ref_extend_attention``).

    Args:
        q: ``[T, Hq, D]`` new tokens of all requests, concatenated in request order.
        k_new, v_new: ``[T, Hkv, D]`` their post-RoPE K and V (head_dim contiguous).
        cache: the paged store; pages that became full in this extend must be committed, a
            partial prefix page and the sink pages must have fp16 slots.
        page_table: ``int [B, max_pages]``; prefix_lens, extend_lens: ``int [B]`` (host
            lists, or tensors: a device tensor costs a host synchronisation).
        blocks: the pass's ``extend_blocks`` (built once per pass); lengths then unused.
    Returns:
        ``[T, Hq, D]`` in q's dtype.
    """
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
    group = hq // hkv
    if blocks is None:
        lens = []
        for name, x in (("prefix_lens", prefix_lens), ("extend_lens", extend_lens)):
            if isinstance(x, torch.Tensor):
                if x.shape != (b,) or x.dtype not in INDEX_DTYPES:
                    got = f"{list(x.shape)} {x.dtype}"
                    raise ValueError(
                        f"Invalid shape of {name}: expected [{b}] int32/int64, got {got}"
                    )
                x = x.tolist()
            if len(x) != b:
                raise ValueError(f"Invalid shape of {name}: expected [{b}], got [{len(x)}]")
            lens.append([int(v) for v in x])
        blocks = extend_blocks(*lens, config, group, q.device)
    if blocks.tokens != t:
        raise ValueError(f"Invalid extend_lens: they sum to {blocks.tokens}, q has {t} tokens")
    # Written in the slots' (the model's) dtype, whatever q's: one compiled variant.
    out = torch.zeros(t, hq, d, dtype=cache.slot_k.dtype, device=q.device)
    if not blocks.count:
        return out.to(q.dtype)
    qf = q.float().contiguous()
    h = hadamard_matrix(d, q.device)
    qr = (qf @ h).contiguous()
    packed, sk, sv = cache.packed, cache.slot_k, cache.slot_v
    dt, op = dot_dtypes(sk.dtype, _extend_kernel)
    rows, tok, warps = block_shape(d, group, config.page_size)
    kb, fb = key_blocks(d, config.page_size)
    _extend_kernel[(blocks.count, hkv)](
        qf, qr, k_new, v_new, k_new.stride(0), k_new.stride(1),
        packed, packed.view(torch.float16), packed.stride(0), packed.stride(1),
        sk, sv, sk.stride(0), sk.stride(1), sk.stride(2),
        cache.page_slot, page_table, page_table.stride(0),
        blocks.blocks, blocks.row0, hadamard_signs(d, q.device), out,
        sm_scale * LOG2E, d**-0.5, config.sink_pages,
        *record_offsets(config.layout),
        HQ=hq, G=config.page_size, D=d, GROUP=group, K_BITS=config.k_bits,
        V_BITS=config.v_bits, BM=rows, TOK=tok, KB=kb, FB=fb, DT=dt, OP=op,
        ASM=compiled(_extend_kernel), num_warps=warps, num_stages=1,
    )  # fmt: skip
    return out.to(q.dtype)
