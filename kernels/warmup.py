"""Compile, at server start, every kernel variant serving will launch.

Triton compiles a kernel the first time it sees a new specialization: new constexprs, new
dtypes, or an integer argument newly equal to 1 or divisible by 16, or a pointer newly
16-byte aligned or not. The launchers keep everything that varies while serving out of that
key (split count, page-table width, tile count: runtime arguments Triton does not specialize
on; block tables aligned), so a server needs one variant per kernel for its model: decode's
split and merge stages, extend, and commit of K and of V, both from the pass's new tokens and
from the fp16 slots in place. ``warm_up`` launches each once on a tiny store laid out like the
pool (the same strides, dtypes and alignment), so that none compiles in the middle of serving;
``tests/compile_check.py`` serves contexts from 1 to 16K tokens after it and counts
compilations.
"""

from __future__ import annotations

import time

import torch
import triton

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.numerics import PagedKVCache
from kvarn_sglang.kernels.commit import commit_pages
from kvarn_sglang.kernels.decode import decode_attention
from kvarn_sglang.kernels.extend import extend_attention, extend_blocks


def warm_up(
    config: KVarNConfig,
    num_q_heads: int,
    num_kv_heads: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> tuple[int, float]:
    """Launch every kernel variant a server of this shape needs (``dtype``: the model's and
    the fp16 slots'). Returns ``(variants compiled, seconds)``; variants already compiled
    (Triton's in-process cache) are not counted."""
    g, d, hkv = config.page_size, config.head_dim, num_kv_heads
    compiled = []
    previous = triton.knobs.runtime.jit_cache_hook

    def count(*args, **kwargs):  # called before each compilation
        compiled.append(kwargs.get("repr"))
        return previous(*args, **kwargs) if previous is not None else None

    start = time.perf_counter()
    triton.knobs.runtime.jit_cache_hook = count
    try:
        packed = torch.zeros(3, hkv, config.page_bytes, dtype=torch.uint8, device=device)
        slot_k = torch.zeros(3, g, hkv, d, dtype=dtype, device=device)  # slot 2: scratch
        slot_v = torch.zeros_like(slot_k)
        page_slot = torch.tensor([2, 0, 1], device=device)
        cache = PagedKVCache(packed, slot_k, slot_v, page_slot)
        table = torch.tensor([[1, 2]], device=device)
        q = torch.zeros(1, num_q_heads, d, dtype=dtype, device=device)
        decode_attention(q, cache, table, torch.tensor([g + 1], device=device), config, 1.0)
        k = torch.zeros(g, hkv, d, dtype=dtype, device=device)
        blocks = extend_blocks([0], [g], config, num_q_heads // hkv, device)
        qs = torch.zeros(g, num_q_heads, d, dtype=dtype, device=device)
        extend_attention(qs, k, k, cache, table, [0], [g], config, 1.0, blocks=blocks)
        pages = torch.tensor([1], device=device)
        commit_pages(
            k[None], k[None], config, packed, pages, check_finite=False, skip_row0=True
        )  # from the pass's new tokens
        commit_pages(
            slot_k, slot_v, config, packed, pages, check_finite=False, skip_row0=True,
            in_index=page_slot[pages],
        )  # fmt: skip
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        triton.knobs.runtime.jit_cache_hook = previous
    return len(compiled), time.perf_counter() - start
