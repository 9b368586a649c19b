"""An independent KVarN quantizer in numpy, written from ``docs/quantizer.md`` alone.

It imports nothing from ``kvarn_sglang``: the torch reference and the Triton commit kernel are
checked against it (``tests/test_oracle.py``), so a change that all of the project's
implementations follow together (they share their constants and helpers) still shows. Clarity
over speed; fp32 throughout, as the description says.

``quantize_page(k, v, ...)`` returns the record of one page of one KV head as bytes, and
``quantize_tile`` one oriented tile's codes and metadata (with the pre-rounding quotients, so
that a test can tell a rounding tie from a real difference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32
LOG_LO, LOG_HI = F32(-0.3), F32(10.0)
STD_LO, STD_HI = F32(1e-3), F32(1e3)
STEP_MIN = F32(1e-10)


def hadamard(d: int) -> np.ndarray:
    """Normalized Sylvester Hadamard matrix ``fp32 [d, d]`` (natural order)."""
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(d)).astype(F32)


def _std(m: np.ndarray, axis: int) -> np.ndarray:
    n = m.shape[axis]
    dev = m - m.sum(axis=axis, keepdims=True) / F32(n)
    return np.sqrt((dev * dev).sum(axis=axis, keepdims=True) / F32(n - 1))


def _imbalance(cur: np.ndarray) -> F32:
    col, row = _std(cur, 0), _std(cur, 1)
    return col.max() / max(col.min(), F32(1e-8)) + row.max() / max(row.min(), F32(1e-8))


def normalize(m: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Section 3: ``(s_c [1, C], s_r [R, 1])`` of the lowest imbalance seen."""
    r, c = m.shape
    log_c, log_r = np.zeros((1, c), F32), np.zeros((r, 1), F32)
    best_c, best_r, best = log_c, log_r, _imbalance(m)
    for _ in range(iters):
        cur = m / np.exp(log_c) / np.exp(log_r)
        log_c = np.clip(log_c + np.log(np.clip(_std(cur, 0), STD_LO, STD_HI)), LOG_LO, LOG_HI)
        cur = m / np.exp(log_c) / np.exp(log_r)
        log_r = np.clip(log_r + np.log(np.clip(_std(cur, 1), STD_LO, STD_HI)), LOG_LO, LOG_HI)
        imb = _imbalance(m / np.exp(log_c) / np.exp(log_r))
        if imb <= best:
            best_c, best_r, best = log_c, log_r, imb
    return np.exp(best_c), np.exp(best_r)


def _round(b, lo, step, qmax):
    quotient = (b - lo) / step
    return np.clip(np.rint(quotient), 0, qmax).astype(F32), quotient


@dataclass
class Tile:
    """One quantized oriented tile: ``codes uint8 [R, C]``, ``scale``/``zero`` fp16 ``[R]``,
    ``norm`` fp16 ``[C]``; ``quotient fp32 [R, C]``: ``(b - zero) / step`` before rounding,
    on the grid the row finally took."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    norm: np.ndarray
    quotient: np.ndarray


def quantize_tile(m: np.ndarray, bits: int, iters: int = 8, refits: int = 0) -> Tile:
    """Sections 3-6 on one oriented tile ``m fp32 [R, C]``."""
    m = np.asarray(m, F32)
    qmax = F32(2**bits - 1)
    s_c, s_r = normalize(m, iters)
    b = m / s_c / s_r
    lo, hi = b.min(1, keepdims=True), b.max(1, keepdims=True)
    step = np.maximum((hi - lo) / qmax, STEP_MIN)
    codes, quotient = _round(b, lo, step, qmax)
    w = s_c * s_c
    for _ in range(refits):  # section 5, every row at once
        err = (w * (codes * step + lo - b) ** 2).sum(1, keepdims=True)
        s, sq, sx = w.sum(), (w * codes).sum(1, keepdims=True), (w * b).sum(1, keepdims=True)
        sqq, sqx = (w * codes * codes).sum(1, keepdims=True), (w * codes * b).sum(1, keepdims=True)
        det = s * sqq - sq * sq
        ok = det > F32(1e-6) * s * sqq
        s_new = np.where(ok, (s * sqx - sq * sx) / np.where(ok, det, F32(1)), step)
        s_new = np.maximum(s_new, STEP_MIN)
        z_new = np.where(ok, (sx - s_new * sq) / s, lo)
        c_new, q_new = _round(b, z_new, s_new, qmax)
        err_new = (w * (c_new * s_new + z_new - b) ** 2).sum(1, keepdims=True)
        covers = (z_new - s_new / 2 <= b.min(1, keepdims=True)) & (
            z_new + (qmax + F32(0.5)) * s_new >= b.max(1, keepdims=True)
        )
        take = (err_new < err) & covers
        codes, quotient = np.where(take, c_new, codes), np.where(take, q_new, quotient)
        step, lo = np.where(take, s_new, step), np.where(take, z_new, lo)
    scale, zero, norm = (step * s_r)[:, 0], (lo * s_r)[:, 0], s_c[0]
    row_mag = max(np.abs(scale).max(), np.abs(zero).max())
    col_mag = np.abs(norm).max()
    e = (np.log2(max(col_mag, F32(1e-30))) - np.log2(max(row_mag, F32(1e-30)))) / F32(2)
    c = F32(2.0 ** np.rint(e))
    return Tile(
        codes.astype(np.uint8),
        (scale * c).astype(np.float16),
        (zero * c).astype(np.float16),
        (norm / c).astype(np.float16),
        quotient,
    )


def pack_planar(codes_gd: np.ndarray, bits: int) -> np.ndarray:
    """Section 7: token-major codes ``[G, D]`` -> ``uint8 [G, D * bits / 8]``."""
    g, d = codes_gd.shape
    per = 8 // bits
    out = np.zeros((g, d // per), np.uint8)
    for c in range(d):
        out[:, c % (d // per)] |= codes_gd[:, c].astype(np.uint8) << ((c // (d // per)) * bits)
    return out


def record_fields(g: int, d: int, k_bits: int, v_bits: int) -> list[tuple[str, int, int]]:
    """Section 8: ``(name, offset, nbytes)`` of every field, and the record size as the end."""
    sizes = [
        ("k_codes", g * d * k_bits // 8),
        ("v_codes", g * d * v_bits // 8),
        ("k_scale", 2 * d),
        ("k_zero", 2 * d),
        ("k_norm", 2 * g),
        ("v_scale", 2 * g),
        ("v_zero", 2 * g),
        ("v_norm", 2 * d),
    ]
    fields, offset = [], 0
    for name, n in sizes:
        fields.append((name, offset, n))
        offset += -(-n // 16) * 16
    return fields


def record_bytes(g: int, d: int, k_bits: int, v_bits: int) -> int:
    _, offset, n = record_fields(g, d, k_bits, v_bits)[-1]
    return -(-(offset + n) // 16) * 16


@dataclass
class Page:
    """One page of one KV head: the K and V tiles and the record's bytes."""

    k: Tile
    v: Tile
    record: np.ndarray


def quantize_page(
    k: np.ndarray, v: np.ndarray, k_bits: int, v_bits: int, iters: int = 8, refits: int = 0
) -> Page:
    """The whole description on one page of one KV head: ``k, v [G, D]`` (any float dtype,
    K after RoPE) -> ``Page``."""
    k, v = np.asarray(k, F32), np.asarray(v, F32)
    if not (np.isfinite(k).all() and np.isfinite(v).all()):
        raise ValueError("non-finite input")
    g, d = k.shape
    h = hadamard(d)
    kt = quantize_tile((k @ h).T, k_bits, iters, refits)  # [D, G]: rows are channels
    vt = quantize_tile(v @ h, v_bits, iters, refits)  # [G, D]: rows are tokens
    parts = {
        "k_codes": pack_planar(kt.codes.T, k_bits),
        "v_codes": np.ascontiguousarray(pack_planar(vt.codes, v_bits).T),
        "k_scale": kt.scale,
        "k_zero": kt.zero,
        "k_norm": kt.norm,
        "v_scale": vt.scale,
        "v_zero": vt.zero,
        "v_norm": vt.norm,
    }
    record = np.zeros(record_bytes(g, d, k_bits, v_bits), np.uint8)
    for name, offset, n in record_fields(g, d, k_bits, v_bits):
        raw = np.ascontiguousarray(parts[name]).astype(parts[name].dtype.newbyteorder("<"))
        record[offset : offset + n] = raw.view(np.uint8).reshape(-1)
    return Page(kt, vt, record)


def dequantize_tile(t: Tile) -> np.ndarray:
    """``(code * scale[r] + zero[r]) * norm[c]`` in fp32 (the rotated domain)."""
    s, z, n = (x.astype(F32) for x in (t.scale, t.zero, t.norm))
    return (t.codes.astype(F32) * s[:, None] + z[:, None]) * n[None, :]
