"""Commit kernel: quantize full pages into packed KVarN records (quantize on write).

Sizes: a tile is G tokens x D channels of one KV head of one page, for K or for V (two
launches, so orientation and bit width are compile-time). The grid is persistent: at most
MAX_PROGRAMS programs (``commit_warps``: 16 warps at G x D = 128 x 128), each quantizing tiles
i, i + programs, ... One tile: the rotation on tensor cores in the input's dtype (Hadamard
signs are exact in it: exact products, fp32 accumulation), written to the program's fp32
scratch tile (allocated once per device: a fixed address for CUDA graphs), then quantized by
``quantize_tile._quantize_tile``. Inputs are addressed with their own strides ``[num_pages,
G, H, D]``; records are ``uint8 [num_records, H, page_bytes]`` rows, written at
``out_index[page]`` (the pool's page id), codes in the planar order of
``kvarn_sglang.format.layout``. Metadata is written through an fp16 view of the same buffer (every
field offset is a multiple of 16 bytes).

Reference: ``kvarn_sglang.quant.reference.ref_commit_pages``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.numerics import (
    LOG_MAX,
    LOG_MIN,
    SCALE_MIN,
    STD_MAX,
    STD_MIN,
    check_pages,
)
from kvarn_sglang.kernels.quantize_tile import _quantize_tile, fresh
from kvarn_sglang.kernels.validate import compiled, hadamard_signs


# The number of tiles varies from pass to pass: not specialized on (one compiled variant).
@triton.jit(do_not_specialize=["n_tiles"])
def _commit_tile_kernel(
    x_ptr, stride_xp, stride_xg, stride_xh,  # [P or S, G, H, D] input, last stride 1
    sign_ptr,  # [D, D] Hadamard signs (+1/-1) in OP
    index_ptr,  # [P] int64 record row of each page
    src_ptr,  # [P] int64 input row of each page (with SRC_INDEX: the pool's fp16 slots)
    out_u8_ptr, out_f16_ptr, stride_or, stride_oh,  # records; strides in bytes
    scratch_ptr,  # fp32, per program: two tiles [G * D] (values, codes), 3 R + C values
    codes_off, scale_off, zero_off, norm_off,  # field offsets in bytes
    inv_sqrt_d, ITERS, n_tiles, H,
    G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, REFIT: tl.constexpr,
    LOG_LO: tl.constexpr, LOG_HI: tl.constexpr, STD_LO: tl.constexpr, STD_HI: tl.constexpr,
    SCALE_LO: tl.constexpr, SKIP_ROW0: tl.constexpr, OP: tl.constexpr, CB: tl.constexpr,
    OPAQUE: tl.constexpr, SRC_INDEX: tl.constexpr,
):  # fmt: skip
    # Persistent: program i quantizes tiles i, i + programs, ... (tile = page * H + head).
    tok = tl.arange(0, G)
    scratch = scratch_ptr + tl.program_id(0) * (2 * G * D + 3 * R + C)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        page = tile // H
        head = tile % H
        row = tl.load(index_ptr + page)
        if (row != 0) | (not SKIP_ROW0):  # row 0 pads a static commit list: skipped
            # The rotation, by blocks of CB columns and CB input channels (shared memory and
            # registers at head_dim 256: the input is read by channel blocks, never held
            # whole): exact products (signs are +-1 in the input's dtype), fp32
            # accumulation on tensor cores; it feeds the rounding decisions. OP is fp32 only in
            # Triton's interpreter.
            # The result goes through the program's scratch tile: the statistics then run in a
            # layout that spreads rows and columns over the threads (the tensor-core layout
            # holds 32 columns per thread and spills the per-column vectors), with rows
            # contiguous ([R, C]: rows = channels for K, tokens for V), which keeps the
            # refit's per-row vectors small.
            src = page
            if SRC_INDEX:  # read in place: nothing is gathered, a skipped row reads nothing
                src = tl.load(src_ptr + page)
            x_tile = x_ptr + src * stride_xp + head * stride_xh + tok[:, None] * stride_xg
            for cb in tl.static_range(D // CB):
                # The previous tile's reads are done; one column block at a time (the
                # compiler would otherwise overlap two blocks' accumulators).
                tl.debug_barrier()
                cols = cb * CB + tl.arange(0, CB)
                xr = tl.zeros((G, CB), dtype=tl.float32)
                for kb in tl.static_range(D // CB):
                    kch = kb * CB + tl.arange(0, CB)
                    x = tl.load(x_tile + kch[None, :])
                    sign = tl.load(sign_ptr + kch[:, None] * D + cols[None, :])
                    if tl.float32 == OP:
                        xr = tl.dot(x.to(OP), sign, xr, input_precision="ieee")
                    else:
                        xr = tl.dot(x.to(OP), sign, xr)  # [G, CB]
                xr = xr * inv_sqrt_d
                if PER_CHANNEL:
                    x_offs = tok[:, None] * D + cols[None, :]  # m[d, t] = xr[t, d]
                else:
                    x_offs = tok[:, None] + cols[None, :] * G  # m[t, d] = xr[t, d]
                tl.store(fresh(scratch, OPAQUE) + x_offs, xr)
            tl.debug_barrier()
            _quantize_tile(
                scratch, row * stride_or + head * stride_oh,
                out_u8_ptr, out_f16_ptr, codes_off, scale_off, zero_off, norm_off, ITERS,
                G, D, R, C, BITS, PER_CHANNEL, REFIT, LOG_LO, LOG_HI, STD_LO, STD_HI, SCALE_LO,
                OPAQUE,
            )  # fmt: skip


TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


MAX_PROGRAMS = 132  # persistent programs (1 per SM of an H100/H200); scratch holds their tiles


@lru_cache(maxsize=8)
def _scratch(device: torch.device, tile: int) -> torch.Tensor:
    """``tile`` fp32 values per persistent program, allocated once per device and size (a
    fixed address, so CUDA graphs can capture the commit)."""
    return torch.empty(MAX_PROGRAMS, tile, dtype=torch.float32, device=device)


def commit_warps(page_size: int, head_dim: int) -> int:
    """Warps of a commit program: the fp32 tile and its Sinkhorn temporaries spread so that
    no register spills (64 tile values per thread at most)."""
    return max(4, min(16, page_size * head_dim // (32 * 32)))


def commit_pages(
    k: torch.Tensor,
    v: torch.Tensor,
    config: KVarNConfig,
    out: torch.Tensor | None = None,
    out_index: torch.Tensor | None = None,
    *,
    check_finite: bool = True,
    skip_row0: bool = False,
    in_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize full pages into KVarN records (Triton twin of ``ref_commit_pages``).

    Args:
        k, v: ``[num_pages, G, num_kv_heads, head_dim]`` fp16 or bf16, last dim contiguous;
            with ``in_index``, ``[num_rows, G, num_kv_heads, head_dim]`` (the pool's fp16
            slots) of which row ``in_index[i]`` is page i, read in place.
        config: a KVarN config without quantile clipping (``refit_iters`` as the reference).
        out: ``uint8 [num_records, num_kv_heads, page_bytes]`` to write into (the pool's packed
            store); allocated with ``num_records = num_pages`` when None.
        out_index: ``int64 [num_pages]`` record row of each page; ``arange`` when None.
        check_finite: raise ``ValueError`` on NaN/Inf before writing anything (one host sync).
            Unlike the reference, the kernel does not check that a tile fits the fp16
            metadata range (finite bf16 values beyond about 1e9 would store Inf scales).
        skip_row0: pages whose ``out_index`` is 0 are skipped (SGLang's padding page pads
            the fixed-size commit list of a CUDA-graph decode step): they read nothing.
        in_index: ``int64 [num_pages]`` the row of k/v holding each page (no copy).
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
            f"min/max RTN only (use kvarn_sglang.quant.reference.quantize_pages)"
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
    if in_index is not None:
        if in_index.dim() != 1 or in_index.dtype != torch.int64:
            raise ValueError(
                f"Invalid shape of in_index: expected [num_pages] int64, got "
                f"{list(in_index.shape)} {in_index.dtype}"
            )
        p = in_index.shape[0]
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
        rows = (lambda x: x) if in_index is None else (lambda x: x[in_index])
        check_pages("k", rows(k), g, d)
        check_pages("v", rows(v), g, d)
    if p == 0:
        return out
    out_f16 = out.view(torch.float16)
    op = k.dtype if compiled(_commit_tile_kernel) else torch.float32
    sign = hadamard_signs(d, k.device, op)
    programs = min(p * h, MAX_PROGRAMS)
    scratch = _scratch(k.device, 2 * g * d + 3 * max(g, d) + max(g, d))
    for x, kind, bits, per_channel in (
        (k, "k", config.k_bits, True),
        (v, "v", config.v_bits, False),
    ):
        f = {
            name: layout.field(f"{kind}_{name}").offset
            for name in ("codes", "scale", "zero", "norm")
        }
        _commit_tile_kernel[(programs,)](
            x, x.stride(0), x.stride(1), x.stride(2),
            sign, out_index, out_index if in_index is None else in_index,
            out, out_f16, out.stride(0), out.stride(1), scratch,
            f["codes"], f["scale"], f["zero"], f["norm"],
            1.0 / math.sqrt(d), config.sinkhorn_iters, p * h, h,
            G=g, D=d, R=d if per_channel else g, C=g if per_channel else d,
            BITS=bits, PER_CHANNEL=per_channel, REFIT=config.refit_iters,
            LOG_LO=LOG_MIN, LOG_HI=LOG_MAX, STD_LO=STD_MIN, STD_HI=STD_MAX, SCALE_LO=SCALE_MIN,
            SKIP_ROW0=skip_row0, OP=TORCH_TO_TL[op],
            # Blocks of the rotation (registers and shared memory at head_dim 256: K's
            # scratch layout leaves room for 64 columns at a time only) and opaque scratch
            # addresses (kernels.quantize_tile.fresh) above 128 x 128 tiles.
            CB=64 if per_channel and d > 128 else min(d, 128),
            OPAQUE=op != torch.float32 and g * d > 128 * 128, SRC_INDEX=in_index is not None,
            num_warps=commit_warps(g, d), num_stages=1,
        )  # fmt: skip
    return out
