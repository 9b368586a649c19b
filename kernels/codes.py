"""Packed codes to floats without int-to-float: the byte -> planes step of the kernels.

The records keep codes in the planar order (``kvarn_sglang.format.layout``): a byte holds the codes
of channels j, j + D/per, ... (per = 8/bits) at bit s = 0, bits, ... A code is masked in place
and OR-ed into the bits of a float whose ulp is 1 at bit s (``_plane``), which gives exactly
``MAGIC + code`` in the dot's dtype (fp16: MAGIC = 2^(10-s); bf16, 7 mantissa bits: a code
above bit 7 is first shifted so that it fits). ``load_quarters`` returns a tile's four
channel quarters this way; the kernels fold the MAGIC offsets into the zero-point terms they
compute anyway (``page_tiles``).

On a GPU the byte -> plane step is one ``tl.inline_asm_elementwise`` per plane (two PRMT that
spread 4 bytes over the 16-bit halves of two words, then one LOP3 per word: 2 or 4 codes per
instruction); under Triton's interpreter, which cannot run inline assembly, the same values
come from plain integer ops. ``ASM`` is chosen by the launcher from how Triton runs the kernel
(``kernels.validate.compiled``), never by a user switch. The interpreter also multiplies bf16
operands wrongly and rounds fp32 to bf16 by truncation (Triton 3.8), so there every DT value
is held as fp32 for the dot (OP) after the same round-to-nearest to DT (``round_to``): the
products are the same.
"""

from __future__ import annotations

import triton
import triton.language as tl


def _asm_plane(p: int, bits: int, mant: int, bias: int) -> str:
    """PTX turning 4 packed bytes ($2) into 4 fp16/bf16 values ($0, $1) of plane p."""
    s = p * bits
    sh = max(s + bits - mant, 0)  # bf16: the code must sit below bit 7
    mask = (((1 << bits) - 1) << (s - sh)) * 0x10001
    magic = ((mant - (s - sh) + bias) << mant) * 0x10001
    shift = [f"shr.b32 a, a, {sh};", f"shr.b32 b, b, {sh};"] if sh else []
    return "\n".join(
        [
            "{",
            ".reg .b32 a, b;",
            "prmt.b32 a, $2, 0, 0x4140;",  # bytes 0, 1 -> the two 16-bit halves
            "prmt.b32 b, $2, 0, 0x4342;",  # bytes 2, 3
            *shift,
            f"lop3.b32 $0, a, {mask:#x}, {magic:#x}, 0xEA;",  # (x & mask) | magic
            f"lop3.b32 $1, b, {mask:#x}, {magic:#x}, 0xEA;",
            "}",
        ]
    )


# One inline-asm op per plane (Triton moves a single-result op into the dot operand layout).
ASM_F16_4_0: tl.constexpr = tl.constexpr(_asm_plane(0, 4, 10, 15))
ASM_F16_4_1: tl.constexpr = tl.constexpr(_asm_plane(1, 4, 10, 15))
ASM_F16_2_0: tl.constexpr = tl.constexpr(_asm_plane(0, 2, 10, 15))
ASM_F16_2_1: tl.constexpr = tl.constexpr(_asm_plane(1, 2, 10, 15))
ASM_F16_2_2: tl.constexpr = tl.constexpr(_asm_plane(2, 2, 10, 15))
ASM_F16_2_3: tl.constexpr = tl.constexpr(_asm_plane(3, 2, 10, 15))
ASM_BF16_4_0: tl.constexpr = tl.constexpr(_asm_plane(0, 4, 7, 127))
ASM_BF16_4_1: tl.constexpr = tl.constexpr(_asm_plane(1, 4, 7, 127))
ASM_BF16_2_0: tl.constexpr = tl.constexpr(_asm_plane(0, 2, 7, 127))
ASM_BF16_2_1: tl.constexpr = tl.constexpr(_asm_plane(1, 2, 7, 127))
ASM_BF16_2_2: tl.constexpr = tl.constexpr(_asm_plane(2, 2, 7, 127))
ASM_BF16_2_3: tl.constexpr = tl.constexpr(_asm_plane(3, 2, 7, 127))


@triton.jit
def plane_magic(P: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """MAGIC of plane P: the value a zero code of that plane decodes to (a power of two)."""
    if tl.float16 == DT:
        MANT: tl.constexpr = 10
    else:
        MANT: tl.constexpr = 7
    S: tl.constexpr = P * BITS
    if S + BITS > MANT:
        SH: tl.constexpr = S + BITS - MANT
    else:
        SH: tl.constexpr = 0
    return (1 << (MANT - S + SH)) * 1.0


@triton.jit
def _plane(x16, P: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """``MAGIC + code`` of plane P of bytes ``x16`` (int16 holding 0..255), as DT."""
    if tl.float16 == DT:
        MANT: tl.constexpr = 10
        BIAS: tl.constexpr = 15
    else:
        MANT: tl.constexpr = 7
        BIAS: tl.constexpr = 127
    S: tl.constexpr = P * BITS
    if S + BITS > MANT:
        SH: tl.constexpr = S + BITS - MANT
    else:
        SH: tl.constexpr = 0
    MASK: tl.constexpr = ((1 << BITS) - 1) << (S - SH)
    MAGIC_BITS: tl.constexpr = (MANT - (S - SH) + BIAS) << MANT
    y = ((x16 >> SH) & MASK) | MAGIC_BITS
    return y.to(DT, bitcast=True)


@triton.jit
def _asm(raw, CODE: tl.constexpr, DT: tl.constexpr):
    if tl.float16 == DT:
        return tl.inline_asm_elementwise(CODE, "=r,=r,r", [raw], tl.float16, True, 4)
    else:
        return tl.inline_asm_elementwise(CODE, "=r,=r,r", [raw], tl.bfloat16, True, 4)


@triton.jit
def _planes4(raw, DT: tl.constexpr, ASM: tl.constexpr):
    """Low and high nibble planes of uint8 ``raw``."""
    if ASM:
        if tl.float16 == DT:
            lo = _asm(raw, ASM_F16_4_0, DT)
            hi = _asm(raw, ASM_F16_4_1, DT)
        else:
            lo = _asm(raw, ASM_BF16_4_0, DT)
            hi = _asm(raw, ASM_BF16_4_1, DT)
    else:
        x = raw.to(tl.int16)
        lo = _plane(x, 0, 4, DT)
        hi = _plane(x, 1, 4, DT)
    return lo, hi


@triton.jit
def _planes2(raw, DT: tl.constexpr, ASM: tl.constexpr):
    """The four 2-bit planes of uint8 ``raw``."""
    if ASM:
        if tl.float16 == DT:
            p0 = _asm(raw, ASM_F16_2_0, DT)
            p1 = _asm(raw, ASM_F16_2_1, DT)
            p2 = _asm(raw, ASM_F16_2_2, DT)
            p3 = _asm(raw, ASM_F16_2_3, DT)
        else:
            p0 = _asm(raw, ASM_BF16_2_0, DT)
            p1 = _asm(raw, ASM_BF16_2_1, DT)
            p2 = _asm(raw, ASM_BF16_2_2, DT)
            p3 = _asm(raw, ASM_BF16_2_3, DT)
    else:
        x = raw.to(tl.int16)
        p0 = _plane(x, 0, 2, DT)
        p1 = _plane(x, 1, 2, DT)
        p2 = _plane(x, 2, 2, DT)
        p3 = _plane(x, 3, 2, DT)
    return p0, p1, p2, p3


@triton.jit
def round_to(x, DT: tl.constexpr, OP: tl.constexpr):
    """fp32 ``x`` rounded to the nearest DT value (ties to even), held as OP. Triton's
    interpreter converts fp32 to bf16 by truncation; there (OP fp32, DT bf16) the rounding
    is done on the bits, as the GPU's cvt.rn does."""
    if (tl.bfloat16 == DT) and (tl.float32 == OP):
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(OP)


@triton.jit
def quarter_magic(IDX: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """MAGIC of channel quarter IDX (4-bit: quarters 0, 1 low nibbles, 2, 3 high nibbles)."""
    if BITS == 4:
        return plane_magic(IDX // 2, 4, DT)
    else:
        return plane_magic(IDX, 2, DT)


@triton.jit
def load_quarters(ptr, offs, QB: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr,
                  OP: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """The four channel quarters of a planar code tile, each ``MAGIC_i + code`` (exact in DT),
    as OP.

    ``offs`` are the byte offsets of quarter 0's bytes (any tile shape, e.g. ``[Q, G]`` for K
    or ``[G, Q]`` for V); ``QB`` is the byte distance between channel j and channel j + Q
    within a plane (4-bit codes only: quarters 0 and 1 share no byte).
    """
    if BITS == 4:
        q0, q2 = _planes4(tl.load(ptr + offs), DT, ASM)
        q1, q3 = _planes4(tl.load(ptr + offs + QB), DT, ASM)
    else:
        q0, q1, q2, q3 = _planes2(tl.load(ptr + offs), DT, ASM)
    return q0.to(OP), q1.to(OP), q2.to(OP), q3.to(OP)
