"""One tile's quantization, the body of the commit kernel (``commit.py``): Sinkhorn-like
variance normalization, round to nearest, the ``_plus`` refits, scale absorption and planar
packing, on a rotated, oriented tile ``m [R, C]`` held in the program's scratch memory.

Registers are the constraint (16 warps leave 128 per thread; the tile alone is 32 fp32 values
per thread at 128 x 128): ``m`` and the balanced tile are re-read from scratch each time they
are needed (volatile loads, so no copy stays in registers across loops), the best scales so
far and the refit's codes wait in scratch too, and the refits' five row sums are one
reduction. Quotients that sit inside loops are products (within an ulp), rounding included.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_half_even(x):
    """Round to nearest, ties to even (torch.round), without libdevice."""
    f = tl.floor(x)
    frac = x - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(frac > 0.5, f + 1.0, tl.where(frac < 0.5, f, f + odd))


@triton.jit
def _std(m, AXIS: tl.constexpr, N: tl.constexpr):
    """Unbiased std of m along AXIS, dims kept."""
    mean = tl.sum(m, axis=AXIS, keep_dims=True) / N
    dev = m - mean
    return tl.sqrt(tl.sum(dev * dev, axis=AXIS, keep_dims=True) / (N - 1))


@triton.jit
def _rtn(x, zero, scale, QMAX: tl.constexpr):
    """Codes of x on the grid ``zero + k * scale``, k in [0, QMAX], as fp32. The quotient is
    a product with the row's reciprocal (within an ulp: only an exact rounding tie can
    differ from the reference's division)."""
    return tl.minimum(tl.maximum(round_half_even((x - zero) * (1.0 / scale)), 0.0), QMAX)


@triton.jit
def fresh(ptr, OPAQUE: tl.constexpr):
    """With ``OPAQUE``, ``ptr`` (a 16-byte aligned scalar pointer) as a value the compiler
    cannot see through (an inline-assembly move; never under Triton's interpreter), so that
    the addresses derived from it are computed where they are used, not hoisted out of the
    persistent loop and kept alive (spilled) across the whole tile."""
    if OPAQUE:
        x = tl.inline_asm_elementwise(
            "mov.b64 $0, $1;",
            "=l,l",
            [ptr.to(tl.int64, bitcast=True)],
            dtype=tl.int64,
            is_pure=False,
            pack=1,
        )
        return tl.multiple_of(x.to(ptr.dtype, bitcast=True), 16)
    else:
        return ptr


@triton.jit
def _m(m_ptr, R: tl.constexpr, C: tl.constexpr):
    """The scratch tile ``[R, C]`` (rows contiguous), read anew."""
    return tl.load(m_ptr + tl.arange(0, R)[:, None] + tl.arange(0, C)[None, :] * R, volatile=True)


@triton.jit
def _add5(a0, a1, a2, a3, a4, b0, b1, b2, b3, b4):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4


@triton.jit
def _scaled_std(m_ptr, log_c, log_r, AXIS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """Unbiased std along AXIS of ``m / exp(log_c) / exp(log_r)`` (as two products), dims kept;
    the tile is re-read for each pass instead of being held."""
    N: tl.constexpr = R if AXIS == 0 else C
    ec = tl.exp(-log_c)
    er = tl.exp(-log_r)
    mean = tl.sum(_m(m_ptr, R, C) * ec * er, axis=AXIS, keep_dims=True) / N
    dev = _m(m_ptr, R, C) * ec * er - mean
    return tl.sqrt(tl.sum(dev * dev, axis=AXIS, keep_dims=True) / (N - 1))


@triton.jit
def _imbalance(col, row):
    """max/min of the column stds plus max/min of the row stds."""
    return tl.max(col) / tl.maximum(tl.min(col), 1e-8) + tl.max(row) / tl.maximum(tl.min(row), 1e-8)


@triton.jit
def _round_rows(
    m_ptr, q_ptr, v_ptr, ROW0, R: tl.constexpr, C: tl.constexpr, RB: tl.constexpr,
    BITS: tl.constexpr, REFIT: tl.constexpr, SCALE_LO: tl.constexpr,
):  # fmt: skip
    """Asymmetric RTN (then the refits) of rows ROW0..ROW0+RB of the balanced tile: ``m_ptr``
    and ``q_ptr`` point at the block's first row of the tile and of the codes (rows
    contiguous, row stride 1, column stride R); the scratch vectors at ``v_ptr`` hold the
    best log scales (``[C]`` then ``[R]``) and receive each row's scale and zero point with
    the row normalization absorbed (``[R]`` each, after those)."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    r = tl.arange(0, RB)
    cols = tl.arange(0, C)
    col_norm = tl.exp(tl.load(v_ptr + cols))[None, :]
    row_norm = tl.exp(tl.load(v_ptr + C + ROW0 + r))[:, None]
    offs = r[:, None] + cols[None, :] * R
    bal = tl.load(m_ptr + offs, volatile=True) / col_norm / row_norm
    lo = tl.min(bal, axis=1, keep_dims=True)
    hi = tl.max(bal, axis=1, keep_dims=True)
    scale = tl.maximum((hi - lo) / QMAX, SCALE_LO)
    q = _rtn(bal, lo, scale, QMAX)
    if REFIT > 0:
        # Least-squares refits of each row's scale/zero given its codes, weighted by the
        # squared column norms, then re-rounding; a row keeps a refit only if it lowers the
        # error and clips nothing (reference: kvarn_sglang.quant.rtn.refit_rows, cover=True).
        w = col_norm * col_norm  # [1, C]
        sw = tl.sum(w, axis=1, keep_dims=True)
        row_min = lo
        row_max = hi
        for _ in range(REFIT):
            d0 = q * scale + lo - bal
            wq = w * q
            err, sq, sx, sqq, sqx = tl.reduce(
                (w * d0 * d0, wq, w * bal, wq * q, wq * bal), 1, _add5, keep_dims=True
            )
            det = sw * sqq - sq * sq
            ok = det > 1e-6 * sw * sqq
            s_new = tl.where(ok, (sw * sqx - sq * sx) / tl.maximum(det, 1e-30), scale)
            s_new = tl.maximum(s_new, SCALE_LO)
            z_new = tl.where(ok, (sx - s_new * sq) / sw, lo)
            q_new = _rtn(bal, z_new, s_new, QMAX)
            d1 = q_new * s_new + z_new - bal
            take = tl.sum(w * d1 * d1, axis=1, keep_dims=True) < err
            # The new grid must still cover the row (no element clipped).
            take = take & (z_new - s_new / 2 <= row_min) & (z_new + (QMAX + 0.5) * s_new >= row_max)
            q = tl.where(take, q_new, q)
            scale = tl.where(take, s_new, scale)
            lo = tl.where(take, z_new, lo)
    tl.store(q_ptr + offs, q)
    tl.store(v_ptr + C + R + ROW0 + r[:, None], scale * row_norm)
    tl.store(v_ptr + C + 2 * R + ROW0 + r[:, None], lo * row_norm)


@triton.jit
def _quantize_tile(
    s_ptr, rec, out_u8_ptr, out_f16_ptr, codes_off, scale_off, zero_off, norm_off, ITERS,
    G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, REFIT: tl.constexpr,
    LOG_LO: tl.constexpr, LOG_HI: tl.constexpr, STD_LO: tl.constexpr, STD_HI: tl.constexpr,
    SCALE_LO: tl.constexpr, OPAQUE: tl.constexpr,
):  # fmt: skip
    """Normalize, round and store one rotated, oriented tile ``m [R, C]`` at record ``rec``.

    ``m`` is read from the program's scratch tile (``m_ptr``, rows contiguous) each time it is
    needed, with volatile loads so that the compiler keeps no copy of it in registers across
    loops; the balanced tile later replaces it there.
    """
    m_ptr = s_ptr
    # Sinkhorn-like variance normalization, log domain, best imbalance kept. Each iteration
    # starts from the tile the previous one ended with (m itself at first: exp(0) = 1), so the
    # column stds of the imbalance are the next iteration's column stds: computed once.
    # The best scales so far wait in the scratch vectors (not registers): [C] then [R].
    m_ptr = fresh(m_ptr, OPAQUE)
    v_ptr = m_ptr + 2 * R * C
    log_c = tl.zeros((1, C), dtype=tl.float32)
    log_r = tl.zeros((R, 1), dtype=tl.float32)
    vec_c = v_ptr + tl.arange(0, C)[None, :]
    vec_r = v_ptr + C + tl.arange(0, R)[:, None]
    tl.store(vec_c, log_c)
    tl.store(vec_r, log_r)
    col = _std(_m(m_ptr, R, C), 0, R)
    best_imb = _imbalance(col, _std(_m(m_ptr, R, C), 1, C))
    for _ in range(ITERS):
        log_c = tl.minimum(
            tl.maximum(log_c + tl.log(tl.minimum(tl.maximum(col, STD_LO), STD_HI)), LOG_LO), LOG_HI
        )
        # m / exp(log_c) / exp(log_r) as two products (within an ulp of the quotients).
        row_std = _scaled_std(m_ptr, log_c, log_r, 1, R, C)
        log_r = tl.minimum(
            tl.maximum(log_r + tl.log(tl.minimum(tl.maximum(row_std, STD_LO), STD_HI)), LOG_LO),
            LOG_HI,
        )
        col = _scaled_std(m_ptr, log_c, log_r, 0, R, C)
        imb = _imbalance(col, _scaled_std(m_ptr, log_c, log_r, 1, R, C))
        better = imb <= best_imb
        tl.store(vec_c, log_c, mask=better)
        tl.store(vec_r, log_r, mask=better)
        best_imb = tl.minimum(imb, best_imb)
    tl.debug_barrier()

    # Round to nearest (and refit) by blocks of RB rows: rows are independent from here on.
    # The codes go to the second scratch tile, each row's scale and zero point (the
    # normalization absorbed) to scratch vectors.
    RB: tl.constexpr = R // 8
    for rb in range(R // RB):  # a loop, not unrolled: one block live at a time
        b_ptr = fresh(s_ptr, OPAQUE)
        _round_rows(
            b_ptr + rb * RB,
            b_ptr + R * C + rb * RB,
            b_ptr + 2 * R * C,
            rb * RB,
            R,
            C,
            RB,
            BITS,
            REFIT,
            SCALE_LO,
        )
    tl.debug_barrier()

    # Absorb the normalization; trade one power of two between rows and columns.
    m_ptr = fresh(s_ptr, OPAQUE)
    v_ptr = m_ptr + 2 * R * C
    q_ptr = m_ptr + R * C
    rows = tl.arange(0, R)
    cols = tl.arange(0, C)
    scale = tl.load(v_ptr + C + R + rows)
    zero = tl.load(v_ptr + C + 2 * R + rows)
    col_norm = tl.exp(tl.load(v_ptr + cols))
    row_mag = tl.maximum(tl.max(tl.abs(scale)), tl.max(tl.abs(zero)))
    col_mag = tl.max(tl.abs(col_norm))
    lr = tl.log2(tl.maximum(row_mag, 1e-30))
    lc = tl.log2(tl.maximum(col_mag, 1e-30))
    c = tl.exp2(round_half_even((lc - lr) * 0.5))
    codes = _m(q_ptr, R, C).to(tl.int32)

    # Planar order along the channels: byte j holds channels j, j + D/PER, ... (PER = 8/BITS);
    # K bytes are stored [G, D/PER] (by token), V bytes [D/PER, G] (by channel slot).
    PER: tl.constexpr = 8 // BITS
    shifts = tl.arange(0, PER) * BITS
    tokens = tl.arange(0, G)
    slots = tl.arange(0, D // PER)
    if PER_CHANNEL:  # codes [D, G]: channel = plane * D/PER + slot
        planes = tl.reshape(codes, (PER, D // PER, G))
        packed = tl.sum(planes << shifts[:, None, None], axis=0).to(tl.uint8)  # [slot, token]
        dst = tokens[None, :] * (D // PER) + slots[:, None]
    else:  # codes [G, D]
        planes = tl.reshape(codes, (G, PER, D // PER))
        packed = tl.sum(planes << shifts[None, :, None], axis=1).to(tl.uint8)  # [token, slot]
        dst = slots[None, :] * G + tokens[:, None]
    tl.store(out_u8_ptr + rec + codes_off + dst, packed)
    rec16 = rec // 2
    tl.store(out_f16_ptr + rec16 + scale_off // 2 + rows, (scale * c).to(tl.float16))
    tl.store(out_f16_ptr + rec16 + zero_off // 2 + rows, (zero * c).to(tl.float16))
    tl.store(out_f16_ptr + rec16 + norm_off // 2 + cols, (col_norm / c).to(tl.float16))
