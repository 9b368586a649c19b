"""Commit kernel: quantize full pages into packed KVarN records (quantize on write).

Sizes: one program quantizes one tile, i.e. G tokens x D channels of one KV head of one
page, for K or for V (two launches, so orientation and bit width are compile-time). The
whole tile lives in registers: G x D fp32 (at most 128 x 256). Inputs are addressed with
their own strides ``[num_pages, G, H, D]``; records are ``uint8 [num_records, H, page_bytes]``
rows, written at ``out_index[page]`` (the pool's page id). Metadata is written through an fp16
view of the same buffer (every field offset is a multiple of 16 bytes).

Reference: ``kvarn_sglang.reference.ref_commit_pages``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from kvarn_sglang.config import KVarNConfig
from kvarn_sglang.reference import (
    LOG_MAX,
    LOG_MIN,
    SCALE_MIN,
    STD_MAX,
    STD_MIN,
    check_pages,
    hadamard_matrix,
)


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
def _imbalance(m, R: tl.constexpr, C: tl.constexpr):
    col = _std(m, 0, R)
    row = _std(m, 1, C)
    return tl.max(col) / tl.maximum(tl.min(col), 1e-8) + tl.max(row) / tl.maximum(tl.min(row), 1e-8)


@triton.jit
def _commit_tile_kernel(
    x_ptr, stride_xp, stride_xg, stride_xh,  # [P, G, H, D] input, last stride 1
    sign_ptr,  # [D, D] Hadamard signs (+1/-1), fp32
    index_ptr,  # [P] int64 record row of each page
    out_u8_ptr, out_f16_ptr, stride_or, stride_oh,  # records; strides in bytes
    codes_off, scale_off, zero_off, norm_off,  # field offsets in bytes
    inv_sqrt_d, ITERS,
    G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, REFIT: tl.constexpr,
    LOG_LO: tl.constexpr, LOG_HI: tl.constexpr, STD_LO: tl.constexpr, STD_HI: tl.constexpr,
    SCALE_LO: tl.constexpr, SKIP_ROW0: tl.constexpr,
):  # fmt: skip
    page = tl.program_id(0)
    head = tl.program_id(1)
    if SKIP_ROW0:  # noqa: SIM102 (a constexpr guard: Triton compiles it away)
        if tl.load(index_ptr + page) == 0:  # padding entry of a static commit list
            return
    tok = tl.arange(0, G)
    ch = tl.arange(0, D)
    x = tl.load(
        x_ptr + page * stride_xp + head * stride_xh + tok[:, None] * stride_xg + ch[None, :]
    )
    sign = tl.load(sign_ptr + ch[:, None] * D + ch[None, :])
    # Exact fp32 products (not tf32): the rotation feeds the rounding decisions.
    xr = tl.dot(x.to(tl.float32), sign, input_precision="ieee") * inv_sqrt_d  # [G, D]
    # [R, C]: rows = channels ([D, G]) for K, rows = tokens ([G, D]) for V.
    m = tl.trans(xr) if PER_CHANNEL else xr

    # Sinkhorn-like variance normalization, log domain, best imbalance kept.
    log_c = tl.zeros((1, C), dtype=tl.float32)
    log_r = tl.zeros((R, 1), dtype=tl.float32)
    best_c = log_c
    best_r = log_r
    best_imb = _imbalance(m, R, C)
    for _ in range(ITERS):
        cur = m / tl.exp(log_c) / tl.exp(log_r)
        col_std = tl.minimum(tl.maximum(_std(cur, 0, R), STD_LO), STD_HI)
        log_c = tl.minimum(tl.maximum(log_c + tl.log(col_std), LOG_LO), LOG_HI)
        cur = m / tl.exp(log_c) / tl.exp(log_r)
        row_std = tl.minimum(tl.maximum(_std(cur, 1, C), STD_LO), STD_HI)
        log_r = tl.minimum(tl.maximum(log_r + tl.log(row_std), LOG_LO), LOG_HI)
        cur = m / tl.exp(log_c) / tl.exp(log_r)
        imb = _imbalance(cur, R, C)
        better = imb <= best_imb
        best_c = tl.where(better, log_c, best_c)
        best_r = tl.where(better, log_r, best_r)
        best_imb = tl.minimum(imb, best_imb)
    col_norm = tl.exp(best_c)
    row_norm = tl.exp(best_r)

    # Asymmetric RTN per row of the balanced tile.
    QMAX: tl.constexpr = (1 << BITS) - 1
    bal = m / col_norm / row_norm
    lo = tl.min(bal, axis=1, keep_dims=True)
    hi = tl.max(bal, axis=1, keep_dims=True)
    scale = tl.maximum((hi - lo) / QMAX, SCALE_LO)
    q = tl.minimum(tl.maximum(round_half_even((bal - lo) / scale), 0.0), QMAX)
    if REFIT > 0:
        # Least-squares refits of each row's scale/zero given its codes, weighted by the
        # squared column norms, then re-rounding; a row keeps a refit only if it lowers the
        # error and clips nothing (reference: kvarn_sglang.rtn.refit_rows, cover=True).
        w = col_norm * col_norm  # [1, C]
        sw = tl.sum(w, axis=1, keep_dims=True)
        row_min = lo
        row_max = hi
        for _ in tl.static_range(REFIT):
            d0 = q * scale + lo - bal
            err = tl.sum(w * d0 * d0, axis=1, keep_dims=True)
            sq = tl.sum(w * q, axis=1, keep_dims=True)
            sx = tl.sum(w * bal, axis=1, keep_dims=True)
            sqq = tl.sum(w * q * q, axis=1, keep_dims=True)
            sqx = tl.sum(w * q * bal, axis=1, keep_dims=True)
            det = sw * sqq - sq * sq
            ok = det > 1e-6 * sw * sqq
            s_new = tl.where(ok, (sw * sqx - sq * sx) / tl.maximum(det, 1e-30), scale)
            s_new = tl.maximum(s_new, SCALE_LO)
            z_new = tl.where(ok, (sx - s_new * sq) / sw, lo)
            q_new = tl.minimum(tl.maximum(round_half_even((bal - z_new) / s_new), 0.0), QMAX)
            d1 = q_new * s_new + z_new - bal
            take = tl.sum(w * d1 * d1, axis=1, keep_dims=True) < err
            # The new grid must still cover the row (no element clipped).
            take = take & (z_new - s_new / 2 <= row_min) & (z_new + (QMAX + 0.5) * s_new >= row_max)
            q = tl.where(take, q_new, q)
            scale = tl.where(take, s_new, scale)
            lo = tl.where(take, z_new, lo)
    codes = q.to(tl.int32)

    # Absorb the normalization; trade one power of two between rows and columns.
    scale = scale * row_norm
    zero = lo * row_norm
    row_mag = tl.maximum(tl.max(tl.abs(scale)), tl.max(tl.abs(zero)))
    col_mag = tl.max(tl.abs(col_norm))
    lr = tl.log2(tl.maximum(row_mag, 1e-30))
    lc = tl.log2(tl.maximum(col_mag, 1e-30))
    c = tl.exp2(round_half_even((lc - lr) * 0.5))

    rec = tl.load(index_ptr + page) * stride_or + head * stride_oh
    PER: tl.constexpr = 8 // BITS
    packed_cols = tl.arange(0, C // PER)
    shifts = tl.arange(0, PER) * BITS
    grouped = tl.reshape(codes, (R, C // PER, PER))
    packed = tl.sum(grouped << shifts[None, None, :], axis=2).to(tl.uint8)
    rows = tl.arange(0, R)
    tl.store(
        out_u8_ptr + rec + codes_off + rows[:, None] * (C // PER) + packed_cols[None, :], packed
    )
    rec16 = rec // 2
    tl.store(out_f16_ptr + rec16 + scale_off // 2 + rows[:, None], (scale * c).to(tl.float16))
    tl.store(out_f16_ptr + rec16 + zero_off // 2 + rows[:, None], (zero * c).to(tl.float16))
    cols = tl.arange(0, C)
    tl.store(out_f16_ptr + rec16 + norm_off // 2 + cols[None, :], (col_norm / c).to(tl.float16))


@lru_cache(maxsize=32)
def _hadamard_signs(d: int, device: torch.device) -> torch.Tensor:
    """The unnormalized Sylvester Hadamard matrix (entries +1/-1), fp32 [d, d]."""
    return (hadamard_matrix(d, device) * math.sqrt(d)).round().contiguous()


def commit_pages(
    k: torch.Tensor,
    v: torch.Tensor,
    config: KVarNConfig,
    out: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    *,
    check_finite: bool = True,
    skip_row0: bool = False,
) -> torch.Tensor:
    """Quantize full pages into KVarN records (Triton twin of ``ref_commit_pages``).

    Args:
        k, v: ``[num_pages, G, num_kv_heads, head_dim]`` fp16 or bf16, last dim contiguous.
        config: a KVarN config without quantile clipping (``refit_iters`` as the reference).
        out: ``uint8 [num_records, num_kv_heads, page_bytes]`` to write into (the pool's packed
            store); allocated with ``num_records = num_pages`` when None.
        out_index: ``int64 [num_pages]`` record row of each page; ``arange`` when None.
        check_finite: raise ``ValueError`` on NaN/Inf before writing anything (one host sync).
            Unlike the reference, the kernel does not check that a tile fits the fp16
            metadata range (finite bf16 values beyond about 1e9 would store Inf scales).
        skip_row0: pages whose ``out_index`` is 0 are skipped (SGLang's padding page pads
            the fixed-size commit list of a CUDA-graph decode step).
    Returns:
        ``out``.
    """
    if k.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"Unsupported dtype of k: expected float16 or bfloat16, got {k.dtype}")
    if v.dtype != k.dtype:
        raise TypeError(f"Unsupported dtype of v: expected {k.dtype}, got {v.dtype}")
    if config.clip_quantile > 0:
        raise ValueError(
            f"Unsupported clip_quantile {config.clip_quantile}: the commit kernel implements "
            f"min/max RTN only (use kvarn_sglang.reference.quantize_pages)"
        )
    g, d = config.page_size, config.head_dim
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 4 or x.shape[1] != g or x.shape[3] != d:
            raise ValueError(
                f"Invalid shape of {name}: expected [num_pages, {g}, num_kv_heads, {d}], "
                f"got {list(x.shape)}"
            )
        if x.stride(3) != 1:
            raise ValueError(f"Invalid stride of {name}: head_dim must be contiguous")
    if v.shape != k.shape:
        raise ValueError(f"Invalid shape of v: expected {list(k.shape)}, got {list(v.shape)}")
    if v.device != k.device:
        raise ValueError(f"Invalid device of v: expected {k.device}, got {v.device}")
    p, _, h, _ = k.shape
    layout = config.layout
    if out is None:
        out = torch.zeros(p, h, layout.page_bytes, dtype=torch.uint8, device=k.device)
    if out.dtype != torch.uint8 or out.dim() != 3 or tuple(out.shape[1:]) != (h, layout.page_bytes):
        raise ValueError(
            f"Invalid shape of out: expected [num_records, {h}, {layout.page_bytes}] uint8, "
            f"got {list(out.shape)} {out.dtype}"
        )
    if out.stride(2) != 1 or out.stride(1) % 16 or out.stride(0) % 16:
        raise ValueError("Invalid stride of out: records must be contiguous and 16-byte aligned")
    if out_index is None:
        out_index = torch.arange(p, device=k.device)
    if out_index.shape != (p,) or out_index.dtype != torch.int64:
        raise ValueError(
            f"Invalid shape of out_index: expected [{p}] int64, got {list(out_index.shape)} "
            f"{out_index.dtype}"
        )
    if check_finite:
        check_pages("k", k, g, d)
        check_pages("v", v, g, d)
    if p == 0:
        return out
    sign = _hadamard_signs(d, k.device)
    out_f16 = out.view(torch.float16)
    for x, kind, bits, per_channel in (
        (k, "k", config.k_bits, True),
        (v, "v", config.v_bits, False),
    ):
        f = {
            name: layout.field(f"{kind}_{name}").offset
            for name in ("codes", "scale", "zero", "norm")
        }
        _commit_tile_kernel[(p, h)](
            x, x.stride(0), x.stride(1), x.stride(2),
            sign, out_index,
            out, out_f16, out.stride(0), out.stride(1),
            f["codes"], f["scale"], f["zero"], f["norm"],
            1.0 / math.sqrt(d), config.sinkhorn_iters,
            G=g, D=d, R=d if per_channel else g, C=g if per_channel else d,
            BITS=bits, PER_CHANNEL=per_channel, REFIT=config.refit_iters,
            LOG_LO=LOG_MIN, LOG_HI=LOG_MAX, STD_LO=STD_MIN, STD_HI=STD_MAX, SCALE_LO=SCALE_MIN,
            SKIP_ROW0=skip_row0,
        )  # fmt: skip
    return out
