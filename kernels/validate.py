"""Input validation shared by the attention launchers (shapes, dtypes, devices, strides)."""

from __future__ import annotations

import torch
import triton.language as tl

from kvarn_sglang.config import KVarNConfig
from kvarn_sglang.reference import PagedKVCache

INDEX_DTYPES = (torch.int32, torch.int64)


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


def slot_operand_dtype(slot_k: torch.Tensor):
    """Operand type of the fp16-page dot products: fp16 slots feed fp16 tensor cores; bf16
    slots are widened to fp32 (exact), since a bf16 value may not fit in fp16."""
    return tl.float16 if slot_k.dtype == torch.float16 else tl.float32
