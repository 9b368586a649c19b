"""A paged KVarN store with random contents, for timing and compiling decode kernels.

Timing and register counts do not depend on the values in a page, so the decode benchmark
and the static kernel cost tool build their inputs here instead of quantizing real K/V.
"""

from __future__ import annotations

import torch

from kvarn_sglang.format.numerics import PagedKVCache


def random_store(cfg, batch: int, ctx: int, hkv: int, device: str, all_fp16: bool):
    """A paged store for ``batch`` requests of ``ctx`` tokens with random contents.

    Packed records hold random codes and small positive fp16 metadata (timing does not
    depend on values). Every request has its sink and own page in fp16 slots; with
    ``all_fp16`` every page has a slot. Returns ``(cache, page_table, seq_lens, bytes_read)``.
    """
    g, d = cfg.page_size, cfg.head_dim
    pages_per_req = -(-ctx // g)
    total = batch * pages_per_req + 1
    layout = cfg.layout
    packed = torch.randint(
        0, 256, (total, hkv, layout.page_bytes), dtype=torch.uint8, device=device
    )
    meta = packed.view(torch.float16)
    for f in layout.fields:
        if f.dtype == torch.float16:
            lo, hi = f.offset // 2, (f.offset + f.nbytes) // 2
            meta[..., lo:hi] = torch.rand(total, hkv, hi - lo, device=device).half() * 0.1 + 0.01
    fp16_pages = pages_per_req if all_fp16 else min(2, pages_per_req)
    slots = batch * fp16_pages
    slot_k = torch.randn(slots, g, hkv, d, dtype=torch.float16, device=device)
    slot_v = torch.randn_like(slot_k)
    page_slot = torch.full((total,), -1, dtype=torch.int64, device=device)
    table = torch.randperm(total - 1, device=device).view(batch, pages_per_req) + 1
    fp16_idx = table[:, :fp16_pages] if all_fp16 else table[:, [0, pages_per_req - 1]]
    page_slot[fp16_idx.reshape(-1)] = torch.arange(fp16_idx.numel(), device=device)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int64, device=device)
    packed_pages = 0 if all_fp16 else max(0, pages_per_req - 2)
    bytes_read = (
        batch
        * hkv
        * (packed_pages * layout.page_bytes + (pages_per_req - packed_pages) * g * d * 2 * 2)
    )
    return PagedKVCache(packed, slot_k, slot_v, page_slot), table, seq_lens, bytes_read
