"""Codes to floats without int-to-float (``kernels/page_tiles.py``) and the bf16 path.

* A kernel reads the four channel quarters of planar code tiles: on CPU (the interpreter)
  through plain integer ops, on a GPU through the inline assembly; both must give exactly
  ``MAGIC + code`` for every byte value, plane, bit width and dtype.
* The inline assembly itself is checked on CPU by emulating its PTX (prmt, shr, lop3).
* Decode with bf16 slots at the extremes the normalization allows (a K channel scaled far
  beyond fp16 range once multiplied by the query) matches the reference.
"""

from __future__ import annotations

import re

import pytest
import torch
import triton
import triton.language as tl
from paged_helpers import build_cache, device

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.layout import pack_planar, unpack_planar
from kvarn_sglang.format.numerics import PagedKVCache
from kvarn_sglang.kernels.codes import _asm_plane, load_quarters, quarter_magic
from kvarn_sglang.kernels.decode import decode_attention
from kvarn_sglang.kernels.validate import compiled, dot_dtypes
from kvarn_sglang.quant.reference import ref_decode_attention, rotate

TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _quarters_kernel(x_ptr, o_ptr, R: tl.constexpr, C: tl.constexpr, BITS: tl.constexpr,
                     DT: tl.constexpr, OP: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    # A tile of R bytes per channel slot ([R, C/per] bytes stored by slot, rows contiguous, as
    # the V codes are): quarter i holds channels i*C/4 .. (i+1)*C/4 - 1.
    Q: tl.constexpr = C // 4
    r = tl.arange(0, R)
    c = tl.arange(0, Q)
    offs = c[None, :] * R + r[:, None]
    q0, q1, q2, q3 = load_quarters(x_ptr, offs, Q * R, BITS, DT, OP, ASM)
    o = o_ptr + r[:, None] * C + c[None, :]
    tl.store(o, q0.to(tl.float32) - quarter_magic(0, BITS, DT))
    tl.store(o + Q, q1.to(tl.float32) - quarter_magic(1, BITS, DT))
    tl.store(o + 2 * Q, q2.to(tl.float32) - quarter_magic(2, BITS, DT))
    tl.store(o + 3 * Q, q3.to(tl.float32) - quarter_magic(3, BITS, DT))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [2, 4])
def test_quarters_decode_every_code_exactly(bits, dtype):
    rows, cols = 16, 64
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=gen, dtype=torch.uint8)
    codes[0, : 2**bits] = torch.arange(2**bits, dtype=torch.uint8)  # every value appears
    packed = pack_planar(codes, bits)  # [rows, cols * bits / 8]
    assert torch.equal(unpack_planar(packed, bits), codes)
    stored = packed.t().contiguous().to(device())  # by slot, rows contiguous
    out = torch.zeros(rows, cols, device=device())
    dt, op = dot_dtypes(dtype, _quarters_kernel)
    _quarters_kernel[(1,)](
        stored, out, R=rows, C=cols, BITS=bits, DT=dt, OP=op, ASM=compiled(_quarters_kernel)
    )
    assert torch.equal(out.cpu(), codes.float()), f"bits={bits} dtype={dtype}"


def _emulate(asm: str, word: int) -> list[int]:
    """Run the PTX of ``_asm_plane`` on one 32-bit input; returns the two output words."""
    regs = {"$2": word}

    def val(x: str) -> int:
        x = x.strip()
        return regs[x] if x in regs else int(x, 0)

    for line in asm.splitlines():
        m = re.match(r"(prmt|shr|lop3)\.b32 (\S+), (.*);", line.strip())
        if not m:
            continue
        op, dst, args = (
            m.group(1),
            m.group(2).rstrip(","),
            [a.strip() for a in m.group(3).split(",")],
        )
        if op == "prmt":  # bytes of {b, a}; selector nibble i picks result byte i
            src = val(args[0]) | (val(args[1]) << 32)
            sel = val(args[2])
            regs[dst] = sum(
                ((src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4)
            )
        elif op == "shr":
            regs[dst] = val(args[0]) >> val(args[1])
        else:  # lop3 with LUT 0xEA: (a & b) | c
            assert val(args[3]) == 0xEA
            regs[dst] = (val(args[0]) & val(args[1])) | val(args[2])
    return [regs["$0"], regs["$1"]]


@pytest.mark.parametrize("mant, bias, dtype", [(10, 15, torch.float16), (7, 127, torch.bfloat16)])
@pytest.mark.parametrize("bits", [2, 4])
def test_inline_assembly_matches_the_integer_path(bits, mant, bias, dtype):
    """Each plane's PTX, emulated on random packed words, yields MAGIC + code in the
    dtype's bits for the 4 bytes, in order: what the interpreter's integer ops compute."""
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (64,), generator=gen, dtype=torch.int64).tolist()
    for plane in range(8 // bits):
        asm = _asm_plane(plane, bits, mant, bias)
        for w in words:
            out = _emulate(asm, w)
            halves = [out[0] & 0xFFFF, out[0] >> 16, out[1] & 0xFFFF, out[1] >> 16]
            got = torch.tensor(halves, dtype=torch.int32).to(torch.int16).view(dtype).float()
            byte = torch.tensor([(w >> (8 * i)) & 0xFF for i in range(4)])
            code = ((byte >> (plane * bits)) & (2**bits - 1)).float()
            s = plane * bits
            magic = 2.0 ** (mant - s + max(s + bits - mant, 0))
            assert torch.equal(got - magic, code), (plane, hex(w), got.tolist())


def test_bf16_decode_at_the_normalization_extremes():
    """A bf16 model's query times a K scale can pass fp16's range (k_norm and k_scale absorb
    normalization factors up to e^10): the packed path runs in bf16, not fp16, so nothing
    overflows and the result matches the reference."""
    g, d, hkv, group = 64, 64, 1, 4
    cfg = KVarNConfig(k_bits=4, v_bits=2, page_size=g, head_dim=d, sink_pages=0)
    gen = torch.Generator().manual_seed(7)
    n = 2 * g + 3
    k = torch.randn(n, hkv, d, generator=gen)
    k[..., :4] *= 2e4  # outlier channels: after the rotation, large K scales everywhere
    k = k.bfloat16().float()
    v = (torch.randn(n, hkv, d, generator=gen) * 300).bfloat16().float()
    q = (torch.randn(1, hkv * group, d, generator=gen) * 3000).bfloat16()
    cache, table = build_cache([(k, v, n, {n // g})], cfg)
    bf = PagedKVCache(
        cache.packed, cache.slot_k.bfloat16(), cache.slot_v.bfloat16(), cache.page_slot
    )
    # The slots hold the exact bf16 values (build_cache writes fp16 copies).
    bf.slot_k[0, : n - 2 * g] = k[2 * g :].bfloat16()
    bf.slot_v[0, : n - 2 * g] = v[2 * g :].bfloat16()
    ref_cache = PagedKVCache(cache.packed, bf.slot_k.float(), bf.slot_v.float(), cache.page_slot)
    lens = torch.tensor([n])
    sm_scale = 1e-7  # logits of order 1 despite the magnitudes
    ref = ref_decode_attention(q.float(), ref_cache, table, lens, cfg, sm_scale)
    dev = device()
    dev_cache = PagedKVCache(*(t.to(dev) for t in (bf.packed, bf.slot_k, bf.slot_v, bf.page_slot)))
    out = decode_attention(q.to(dev), dev_cache, table.to(dev), lens.to(dev), cfg, sm_scale)
    assert torch.isfinite(out).all()
    k_scale = cfg.layout.unpack(cache.packed[table[0, :2]])["k_scale"].float()
    qs = rotate(q.float())[0, :, None, None, :] * k_scale  # q * k_scale per packed page
    assert qs.abs().max() > 65504, "the case must exceed fp16's range"
    # bf16 operands at these magnitudes: the same roundings emulated in torch differ from the
    # fp32 reference by 5.2% of the output's maximum (the kernel: 4.7%).
    atol = 8e-2 * ref.abs().max().item()
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=3e-2)


if __name__ == "__main__":
    test_quarters_decode_every_code_exactly(4, torch.bfloat16)
