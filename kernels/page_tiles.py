"""Triton building blocks shared by the decode and extend kernels: reading one page.

Both kernels keep one online softmax (log2 domain) over two accumulators: the packed pages'
part, in the Hadamard-rotated domain, and the fp16 pages' part in the model's domain, each as
four channel quarters ``[Q, N]`` (Q = D/4; N queries: heads of a GQA group, or tokens of a
block). Every product is transposed: keys or channels are the rows of the tensor-core tiles,
the N queries the (narrow) columns, so no tile row is padding.

A packed page's codes become floats in place (``kernels.codes``) and its scales are folded in:

    s_t  = k_norm[t] * (sum_d qs[d] (MAGIC_d + c[d,t]) + sum_d (q[d] k_zero[d] - MAGIC_d qs[d]))
    pv_d = sum_t ps[t] (MAGIC_d + c[t,d]) + sum_t (p[t] v_zero[t]) - MAGIC_d sum_t ps[t]

with ``qs = q * k_scale`` and ``ps = p * v_scale`` rounded to the dot's dtype DT, the model's
(the same rounded values enter both terms, so the offsets cancel exactly up to fp32
accumulation). Each byte's planes are channel quarters, so q.K is a sum of four dots over
channel quarters and p.V four dots into the four output quarters: no reshape, no interleave.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvarn_sglang.format.layout import PageLayout
from kvarn_sglang.kernels.codes import load_quarters, quarter_magic, round_to

# The score of a key outside a query's sliding window (log2 domain): finite, so a tile whose
# keys a window hides entirely never makes the running maximum -inf (exp2(-inf - -inf) is NaN);
# any visible key's score exceeds it by far more than 150, so exp2 of the gap is exactly 0.
MASKED = tl.constexpr(-1.0e30)


@triton.jit
def softmax_step(s, m_i, l_i):
    """Fold scores ``s [T, N]`` (log2 domain; T keys, N queries) into the running max and
    sum. Returns ``(p [T, N], alpha [N], m_new [N], l_new [N])``."""
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[None, :])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=0)


@triton.jit
def load_value_quarters(ptrs, mask, Q: tl.constexpr, VOLATILE: tl.constexpr = False):
    """The four channel quarters of fp16/bf16 values at ``ptrs`` (quarter i at ``+ i * Q``;
    ``[T, Q]`` for keys or values, ``[Q, N]`` for transposed queries), zero where ``mask`` is
    false. ``VOLATILE`` re-reads them (no copy kept in registers across a loop)."""
    v0 = tl.load(ptrs, mask=mask, other=0.0, volatile=VOLATILE)
    v1 = tl.load(ptrs + Q, mask=mask, other=0.0, volatile=VOLATILE)
    v2 = tl.load(ptrs + 2 * Q, mask=mask, other=0.0, volatile=VOLATILE)
    v3 = tl.load(ptrs + 3 * Q, mask=mask, other=0.0, volatile=VOLATILE)
    return v0, v1, v2, v3


@triton.jit
def store_quarters(ptrs, x0, x1, x2, x3, mask, Q: tl.constexpr):
    """Store the four channel quarters ``x0..x3`` at ``ptrs`` (quarter i at ``+ i * Q``)
    where ``mask`` holds: the inverse of ``load_value_quarters``."""
    tl.store(ptrs, x0, mask=mask)
    tl.store(ptrs + Q, x1, mask=mask)
    tl.store(ptrs + 2 * Q, x2, mask=mask)
    tl.store(ptrs + 3 * Q, x3, mask=mask)


@triton.jit
def rescale_quarters(a0, a1, a2, a3, alpha):
    """Accumulators ``[Q, N]`` times the online softmax's correction ``alpha [N]`` (when an
    fp16 block raised the running maximum, the packed part must follow)."""
    return a0 * alpha[None, :], a1 * alpha[None, :], a2 * alpha[None, :], a3 * alpha[None, :]


@triton.jit
def zero_quarters(Q: tl.constexpr, N: tl.constexpr):
    """Four fp32 accumulators ``[Q, N]``, one per channel quarter."""
    return (
        tl.zeros((Q, N), tl.float32),
        tl.zeros((Q, N), tl.float32),
        tl.zeros((Q, N), tl.float32),
        tl.zeros((Q, N), tl.float32),
    )


@triton.jit
def fp16_page_step(qt, k, v0, v1, v2, v3, mask, m_i, l_i, c0, c1, c2, c3, qk_scale,
                   DT: tl.constexpr, OP: tl.constexpr, WINDOW: tl.constexpr = False):  # fmt: skip
    """Attend queries ``qt [D, N]`` to keys ``k [T, D]`` and values (channel quarters
    ``v0..v3 [T, Q]``), all DT values held as OP, where ``mask`` (``[T, N]`` or broadcastable)
    allows; every query must see at least one key in its first block, unless ``WINDOW``:
    then masked scores are ``MASKED`` (finite), so a block a query's window hides entirely
    adds terms that its first visible key's rescaling (``alpha`` = 0) erases. Accumulators
    ``c0..c3 [Q, N]``; the packed ones are rescaled by the returned ``alpha``."""
    s = tl.dot(k, qt) * qk_scale
    if WINDOW:  # noqa: SIM108 (a constexpr branch)
        s = tl.where(mask, s, MASKED)
    else:
        s = tl.where(mask, s, float("-inf"))
    p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
    p = round_to(p, DT, OP)
    c0 = c0 * alpha[None, :] + tl.dot(tl.trans(v0), p)
    c1 = c1 * alpha[None, :] + tl.dot(tl.trans(v1), p)
    c2 = c2 * alpha[None, :] + tl.dot(tl.trans(v2), p)
    c3 = c3 * alpha[None, :] + tl.dot(tl.trans(v3), p)
    return m_i, l_i, c0, c1, c2, c3, alpha


@triton.jit
def rotate_back(a0, a1, a2, a3, sign_ptr, l_i, inv_sqrt_d, IDX: tl.constexpr, D: tl.constexpr):
    """Channel quarter IDX of ``H @ a / l`` for the rotated accumulators ``a0..a3 [Q, N]``, on
    tensor cores and exact to ~2^-22: each query's column is scaled by a power of two into
    fp16 range and split into two fp16 parts; the Hadamard signs ``[D, D]`` are exact in fp16."""
    Q: tl.constexpr = D // 4
    top = tl.maximum(tl.max(tl.abs(a0), axis=0), tl.max(tl.abs(a1), axis=0))
    top = tl.maximum(top, tl.maximum(tl.max(tl.abs(a2), axis=0), tl.max(tl.abs(a3), axis=0)))
    scale = tl.exp2(14.0 + tl.floor(-tl.log2(tl.maximum(top, 1e-30))))  # max in (2^13, 2^14]
    rows = IDX * Q + tl.arange(0, Q)
    cols = tl.arange(0, Q)
    out = tl.zeros((Q, a0.shape[1]), tl.float32)
    for i in tl.static_range(4):
        if i == 0:
            x = a0 * scale[None, :]
        elif i == 1:
            x = a1 * scale[None, :]
        elif i == 2:
            x = a2 * scale[None, :]
        else:
            x = a3 * scale[None, :]
        hi = x.to(tl.float16)
        lo = (x - hi.to(tl.float32)).to(tl.float16)
        sign = tl.load(sign_ptr + rows[:, None] * D + i * Q + cols[None, :])
        out = tl.dot(sign, hi, out)
        out = tl.dot(sign, lo, out)
    return out * (inv_sqrt_d / (scale * l_i))[None, :]


@triton.jit
def _scores(k_ptr, qs0, qs1, qs2, qs3, bias, kn_ptr, qk_scale, T0: tl.constexpr,
            TB: tl.constexpr, D: tl.constexpr, K_BITS: tl.constexpr, DT: tl.constexpr,
            OP: tl.constexpr, ASM: tl.constexpr, key_lo, WINDOW: tl.constexpr):  # fmt: skip
    """Scores ``[TB, N]`` (log2 domain) of keys T0..T0+TB of a packed page; with ``WINDOW``
    the keys before ``key_lo [N]`` (each query's first key, as an index into the page) score
    ``MASKED``."""
    Q: tl.constexpr = D // 4
    tok = T0 + tl.arange(0, TB)
    # K codes [G, D * K_BITS / 8] by token: quarter tiles [TB, Q], channels contiguous.
    k_offs = tok[:, None] * (D * K_BITS // 8) + tl.arange(0, Q)[None, :]
    k0, k1, k2, k3 = load_quarters(k_ptr, k_offs, Q, K_BITS, DT, OP, ASM)
    s = tl.dot(k0, qs0, tl.zeros((TB, qs0.shape[1]), tl.float32) + bias[None, :])
    s = tl.dot(k1, qs1, s)
    s = tl.dot(k2, qs2, s)
    s = tl.dot(k3, qs3, s)
    s = s * (tl.load(kn_ptr + tok).to(tl.float32) * qk_scale)[:, None]
    if WINDOW:
        s = tl.where(tok[:, None] >= key_lo[None, :], s, MASKED)
    return s


@triton.jit
def _values(v_ptr, p, vs_ptr, vz_ptr, pv0, pv1, pv2, pv3, T0: tl.constexpr, G: tl.constexpr,
            D: tl.constexpr, V_BITS: tl.constexpr, DT: tl.constexpr, OP: tl.constexpr,
            ASM: tl.constexpr):  # fmt: skip
    """Add keys T0..T0+TB (probabilities ``p [TB, N]``) to the value sums: ``pv_i [Q, N]``
    (codes plus offsets, times ``p * v_scale``), and return the row sums the offsets and zero
    points need: ``sum_t p v_zero`` and ``sum_t p v_scale`` (as rounded), both ``[N]``."""
    Q: tl.constexpr = D // 4
    TB: tl.constexpr = p.shape[0]
    tok = T0 + tl.arange(0, TB)
    ps = round_to(p * tl.load(vs_ptr + tok).to(tl.float32)[:, None], DT, OP)
    zv = tl.sum(p * tl.load(vz_ptr + tok).to(tl.float32)[:, None], axis=0)
    sv = tl.sum(ps.to(tl.float32), axis=0)
    # V codes [D * V_BITS / 8, G] by channel slot: quarter tiles [Q, TB], tokens contiguous.
    v_offs = tl.arange(0, Q)[:, None] * G + tok[None, :]
    v0, v1, v2, v3 = load_quarters(v_ptr, v_offs, Q * G, V_BITS, DT, OP, ASM)
    return (
        tl.dot(v0, ps, pv0),
        tl.dot(v1, ps, pv1),
        tl.dot(v2, ps, pv2),
        tl.dot(v3, ps, pv3),
        zv,
        sv,
    )


@triton.jit
def packed_page_step(
    q0, q1, q2, q3, u8_ptr, f16_ptr, rec,
    kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
    m_i, l_i, a0, a1, a2, a3, qk_scale,
    G: tl.constexpr, D: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    DT: tl.constexpr, OP: tl.constexpr, ASM: tl.constexpr, HALVES: tl.constexpr,
    key_lo=0, WINDOW: tl.constexpr = False,
):  # fmt: skip
    """Attend N queries to the packed page record at byte ``rec``, everything transposed so
    that codes are the tensor-core A operand (rows = keys or channels, no padding) and the
    queries the (narrow) B operand: rotated queries ``q0..q3 [Q, N]`` (fp32, channel quarters),
    accumulators ``a0..a3 [Q, N]``, softmax state ``m_i, l_i [N]``. With ``HALVES`` the page's
    keys are read in two blocks of G/2 (fewer live registers at head_dim 256). With ``WINDOW``
    the keys before ``key_lo [N]`` (per query, an index into the page; <= 0 for none) are
    outside the query's sliding window (``_scores``)."""
    Q: tl.constexpr = D // 4
    N: tl.constexpr = q0.shape[1]
    cq = tl.arange(0, Q)
    r16 = rec // 2
    ks = f16_ptr + r16 + ks_off // 2 + cq
    kz = f16_ptr + r16 + kz_off // 2 + cq
    p0 = q0 * tl.load(ks).to(tl.float32)[:, None]
    p1 = q1 * tl.load(ks + Q).to(tl.float32)[:, None]
    p2 = q2 * tl.load(ks + 2 * Q).to(tl.float32)[:, None]
    p3 = q3 * tl.load(ks + 3 * Q).to(tl.float32)[:, None]
    if tl.float16 == DT:
        # q * k_scale can pass fp16's range (k_scale up to 65504): scale each query's products
        # by 2^-k (exact) so the largest is below 2^15, and its scores by 2^k below. k is read
        # from the float's exponent bits (integer operations, no conversion); 0 unless the
        # products reach 2^15, so nothing else changes.
        top = tl.maximum(tl.max(tl.abs(p0), axis=0), tl.max(tl.abs(p1), axis=0))
        top = tl.maximum(top, tl.maximum(tl.max(tl.abs(p2), axis=0), tl.max(tl.abs(p3), axis=0)))
        k = tl.maximum(((top.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 141, 0)  # [N]
        shrink = ((127 - k) << 23).to(tl.float32, bitcast=True)[None, :]
        grow = ((127 + k) << 23).to(tl.float32, bitcast=True)[None, :]
        p0, p1, p2, p3 = p0 * shrink, p1 * shrink, p2 * shrink, p3 * shrink
        q0, q1, q2, q3 = q0 * shrink, q1 * shrink, q2 * shrink, q3 * shrink  # the zero points'
    qs0 = round_to(p0, DT, OP)
    qs1 = round_to(p1, DT, OP)
    qs2 = round_to(p2, DT, OP)
    qs3 = round_to(p3, DT, OP)
    # q . k_zero - MAGIC . qs: the zero point, minus the code offsets the dot adds.
    zt = q0 * tl.load(kz).to(tl.float32)[:, None] - quarter_magic(0, K_BITS, DT) * qs0.to(
        tl.float32
    )
    zt += q1 * tl.load(kz + Q).to(tl.float32)[:, None] - quarter_magic(1, K_BITS, DT) * qs1.to(
        tl.float32
    )
    zt += q2 * tl.load(kz + 2 * Q).to(tl.float32)[:, None] - quarter_magic(2, K_BITS, DT) * qs2.to(
        tl.float32
    )
    zt += q3 * tl.load(kz + 3 * Q).to(tl.float32)[:, None] - quarter_magic(3, K_BITS, DT) * qs3.to(
        tl.float32
    )
    bias = tl.sum(zt, axis=0)  # [N]
    k_ptr = u8_ptr + rec + kc_off
    kn_ptr = f16_ptr + r16 + kn_off // 2
    v_ptr = u8_ptr + rec + vc_off
    vs_ptr = f16_ptr + r16 + vs_off // 2
    vz_ptr = f16_ptr + r16 + vz_off // 2
    pv0 = tl.zeros((Q, N), tl.float32)
    pv1 = tl.zeros((Q, N), tl.float32)
    pv2 = tl.zeros((Q, N), tl.float32)
    pv3 = tl.zeros((Q, N), tl.float32)
    if HALVES:
        TB: tl.constexpr = G // 2
        s = _scores(
            k_ptr, qs0, qs1, qs2, qs3, bias, kn_ptr, qk_scale, 0, TB, D, K_BITS, DT, OP, ASM,
            key_lo, WINDOW,
        )  # fmt: skip
        s2 = _scores(
            k_ptr, qs0, qs1, qs2, qs3, bias, kn_ptr, qk_scale, TB, TB, D, K_BITS, DT, OP, ASM,
            key_lo, WINDOW,
        )  # fmt: skip
        if tl.float16 == DT:  # the scores of the unscaled query (exact: powers of two)
            # kept >= MASKED: a window-masked score scaled up must stay finite
            s, s2 = tl.maximum(s * grow, MASKED), tl.maximum(s2 * grow, MASKED)
        m_new = tl.maximum(m_i, tl.maximum(tl.max(s, axis=0), tl.max(s2, axis=0)))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        p2 = tl.exp2(s2 - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0) + tl.sum(p2, axis=0)
        m_i = m_new
        pv0, pv1, pv2, pv3, zv, sv = _values(
            v_ptr, p, vs_ptr, vz_ptr, pv0, pv1, pv2, pv3, 0, G, D, V_BITS, DT, OP, ASM
        )
        pv0, pv1, pv2, pv3, zv2, sv2 = _values(
            v_ptr, p2, vs_ptr, vz_ptr, pv0, pv1, pv2, pv3, TB, G, D, V_BITS, DT, OP, ASM
        )
        zv += zv2
        sv += sv2
    else:
        s = _scores(
            k_ptr, qs0, qs1, qs2, qs3, bias, kn_ptr, qk_scale, 0, G, D, K_BITS, DT, OP, ASM,
            key_lo, WINDOW,
        )  # fmt: skip
        if tl.float16 == DT:
            s = tl.maximum(s * grow, MASKED)
        p, alpha, m_i, l_i = softmax_step(s, m_i, l_i)
        pv0, pv1, pv2, pv3, zv, sv = _values(
            v_ptr, p, vs_ptr, vz_ptr, pv0, pv1, pv2, pv3, 0, G, D, V_BITS, DT, OP, ASM
        )
    vn = f16_ptr + r16 + vn_off // 2 + cq
    pv0 += (zv - quarter_magic(0, V_BITS, DT) * sv)[None, :]
    a0 = a0 * alpha[None, :] + pv0 * tl.load(vn).to(tl.float32)[:, None]
    pv1 += (zv - quarter_magic(1, V_BITS, DT) * sv)[None, :]
    a1 = a1 * alpha[None, :] + pv1 * tl.load(vn + Q).to(tl.float32)[:, None]
    pv2 += (zv - quarter_magic(2, V_BITS, DT) * sv)[None, :]
    a2 = a2 * alpha[None, :] + pv2 * tl.load(vn + 2 * Q).to(tl.float32)[:, None]
    pv3 += (zv - quarter_magic(3, V_BITS, DT) * sv)[None, :]
    a3 = a3 * alpha[None, :] + pv3 * tl.load(vn + 3 * Q).to(tl.float32)[:, None]
    return m_i, l_i, a0, a1, a2, a3


def record_offsets(layout: PageLayout) -> tuple[int, ...]:
    """Byte offsets of the fields, in ``packed_page_step``'s argument order."""
    off = {f.name: f.offset for f in layout.fields}
    names = ("k_codes", "v_codes", "k_scale", "k_zero", "k_norm", "v_scale", "v_zero", "v_norm")
    return tuple(off[n] for n in names)
