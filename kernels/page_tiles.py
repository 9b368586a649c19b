"""Triton building blocks shared by the decode and extend kernels: reading one page.

Both kernels keep one online softmax (log2 domain) over two accumulators: ``acc_r`` for
packed pages, in the Hadamard-rotated domain, and ``acc_p`` for fp16 pages, in the model's
domain. Shapes: M query rows (heads of a GQA group, or tokens of a block), a page of G
tokens, head_dim D.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvarn_sglang.layout import PageLayout


@triton.jit
def unpack_codes(ptr, R: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr):
    """Load the packed codes of an [R, C] tile (rows packed along C) as fp16 [R, C]."""
    PER: tl.constexpr = 8 // BITS
    rows = tl.arange(0, R)
    cols = tl.arange(0, C // PER)
    raw = tl.load(ptr + rows[:, None] * (C // PER) + cols[None, :]).to(tl.int32)
    shifts = tl.arange(0, PER) * BITS
    codes = (raw[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (R, C)).to(tl.float16)


@triton.jit
def softmax_step(s, m_i, l_i):
    """Fold scores ``s [M, G]`` (log2 domain) into the running max and sum.
    Returns ``(p [M, G], alpha [M], m_new [M], l_new [M])``."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def fp16_page_step(q, k, v, mask, m_i, l_i, acc_r, acc_p, qk_scale):
    """Attend ``q [M, D]`` to an fp16 page ``k, v [G, D]`` where ``mask`` (``[M, G]`` or
    broadcastable) allows; every row must see at least one token."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(mask, s, float("-inf"))
    p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
    acc_p = acc_p * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_i, l_i, acc_r * alpha[:, None], acc_p


@triton.jit
def packed_page_step(
    qr, u8_ptr, f16_ptr, rec,
    kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
    m_i, l_i, acc_r, acc_p, qk_scale,
    G: tl.constexpr, D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
):  # fmt: skip
    """Attend rotated queries ``qr [M, D]`` (fp32) to the packed page record at byte ``rec``,
    scales folded in (KVARN_SPEC.md section 4):
    ``s_t = k_norm[t] * ((qr * k_scale) . code_t + qr . k_zero)`` and
    ``acc_r += v_norm * (sum_t (p_t v_scale[t]) code_t + sum_t p_t v_zero[t])``."""
    ch = tl.arange(0, D)
    tok = tl.arange(0, G)
    rec16 = rec // 2
    k_scale = tl.load(f16_ptr + rec16 + ks_off // 2 + ch).to(tl.float32)
    k_zero = tl.load(f16_ptr + rec16 + kz_off // 2 + ch).to(tl.float32)
    k_norm = tl.load(f16_ptr + rec16 + kn_off // 2 + tok).to(tl.float32)
    k_codes = unpack_codes(u8_ptr + rec + kc_off, D, G, K_BITS)  # [D, G]
    qs = (qr * k_scale[None, :]).to(tl.float16)
    s = tl.dot(qs, k_codes) + tl.sum(qr * k_zero[None, :], axis=1)[:, None]
    p, alpha, m_i, l_i = softmax_step(s * k_norm[None, :] * qk_scale, m_i, l_i)
    v_scale = tl.load(f16_ptr + rec16 + vs_off // 2 + tok).to(tl.float32)
    v_zero = tl.load(f16_ptr + rec16 + vz_off // 2 + tok).to(tl.float32)
    v_norm = tl.load(f16_ptr + rec16 + vn_off // 2 + ch).to(tl.float32)
    v_codes = unpack_codes(u8_ptr + rec + vc_off, G, D, V_BITS)  # [G, D]
    ps = (p * v_scale[None, :]).to(tl.float16)
    pv = tl.dot(ps, v_codes) + tl.sum(p * v_zero[None, :], axis=1)[:, None]
    acc_r = acc_r * alpha[:, None] + pv * v_norm[None, :]
    return m_i, l_i, acc_r, acc_p * alpha[:, None]


def record_offsets(layout: PageLayout) -> tuple[int, ...]:
    """Byte offsets of the fields, in ``packed_page_step``'s argument order."""
    off = {f.name: f.offset for f in layout.fields}
    names = ("k_codes", "v_codes", "k_scale", "k_zero", "k_norm", "v_scale", "v_zero", "v_norm")
    return tuple(off[n] for n in names)
