"""What the launchers share: input validation (shapes, dtypes, devices, strides) and the
facts they derive from their inputs (dot dtype, compiled or interpreted, Hadamard signs)."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.numerics import PagedKVCache, hadamard_matrix

INDEX_DTYPES = (torch.int32, torch.int64)
# The oldest NVIDIA GPU (compute capability) the compiled kernels serve, by model dtype. bf16
# tensor-core dots and conversions need sm_80. The fp16 kernels also compile for sm_75, but
# Triton supports NVIDIA GPUs of compute capability 8.0+ only (its README), so both need sm_80.
MIN_CAPABILITY = {torch.bfloat16: (8, 0), torch.float16: (8, 0)}


def _expect(name: str, x: torch.Tensor, shape: list, dtypes: tuple) -> None:
    ok = x.dim() == len(shape) and all(
        want is None or got == want for got, want in zip(x.shape, shape, strict=True)
    )
    if not ok:
        pretty = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"Invalid shape of {name}: expected {pretty}, got {list(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"Unsupported dtype of {name}: expected {names}, got {x.dtype}")


def check_paged_inputs(
    q: torch.Tensor, cache: PagedKVCache, page_table: torch.Tensor, config: KVarNConfig
) -> tuple[int, int, int, int]:
    """Validate a query batch against a paged store; returns ``(B or T, Hq, D, Hkv)``."""
    d, g = config.head_dim, config.page_size
    _expect("q", q, [None, None, d], (torch.float16, torch.bfloat16, torch.float32))
    packed, sk, sv = cache.packed, cache.slot_k, cache.slot_v
    _expect("packed", packed, [None, None, config.page_bytes], (torch.uint8,))
    hkv = packed.shape[1]
    _expect("slot_k", sk, [None, g, hkv, d], (torch.float16, torch.bfloat16))
    _expect("slot_v", sv, list(sk.shape), (sk.dtype,))
    _expect("page_slot", cache.page_slot, [packed.shape[0]], (torch.int64,))
    _expect("page_table", page_table, [None, None], INDEX_DTYPES)
    if q.shape[1] % hkv:
        raise ValueError(
            f"Invalid shape of q: {q.shape[1]} query heads are not a multiple of {hkv} KV heads"
        )
    for name, x in (
        ("packed", packed),
        ("slot_k", sk),
        ("slot_v", sv),
        ("page_slot", cache.page_slot),
        ("page_table", page_table),
    ):
        if x.device != q.device:
            raise ValueError(f"Invalid device of {name}: expected {q.device}, got {x.device}")
    if packed.stride(2) != 1 or packed.stride(1) % 16 or packed.stride(0) % 16:
        raise ValueError("Invalid stride of packed: records must be contiguous and 16-byte aligned")
    if sk.stride() != sv.stride() or sk.stride(3) != 1:
        raise ValueError("Invalid stride of slot_k/slot_v: equal strides, head_dim contiguous")
    if page_table.stride(1) != 1 or cache.page_slot.stride(0) != 1:
        raise ValueError("Invalid stride of page_table/page_slot: rows must be contiguous")
    return q.shape[0], q.shape[1], d, hkv


def dot_dtypes(model_dtype: torch.dtype, kernel) -> tuple:
    """``(DT, OP)`` of the attention dot products. DT is the model's dtype (fp16 or bf16; what
    the fp16 slots hold): every operand is rounded to it. Packed pages are read in it
    too: a bf16 model's query times a K scale (up to e^10 times the query) may not fit in
    fp16, and codes are exact in either type. OP is the type the operands are held in: DT,
    except under Triton's interpreter, which multiplies bf16 wrongly, where bf16 values are
    held as fp32 (the same products)."""
    if model_dtype == torch.float16:
        return tl.float16, tl.float16
    return tl.bfloat16, (tl.bfloat16 if compiled(kernel) else tl.float32)


def compiled(kernel) -> bool:
    """Whether Triton compiles ``kernel`` for a GPU, rather than running it in its interpreter
    (``TRITON_INTERPRET=1``), where inline assembly cannot run."""
    return not isinstance(kernel, InterpretedFunction)


@lru_cache(maxsize=32)
def hadamard_signs(d: int, device: torch.device, dtype: torch.dtype = torch.float16):
    """The unnormalized Sylvester Hadamard matrix (entries +1/-1, exact in fp16) ``[d, d]``."""
    return (hadamard_matrix(d, device) * math.sqrt(d)).round().to(dtype).contiguous()
