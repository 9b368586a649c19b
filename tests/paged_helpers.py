"""Builders of paged KV stores for attention tests (reference and kernels)."""

from __future__ import annotations

import itertools

import torch

from kvarn_sglang.format.numerics import PagedKVCache
from kvarn_sglang.quant.reference import quantize_pages


def sequence(t: int, hq: int, hkv: int, d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t, hq, d, generator=gen)
    k = torch.randn(t, hkv, d, generator=gen) * 2
    v = torch.randn(t, hkv, d, generator=gen)
    return q, k, v


def build_cache(requests, config, seed: int = 0, device: str = "cpu"):
    """A PagedKVCache holding several requests, pages at shuffled ids.

    requests: list of (k [n, H, D], v, n_stored, fp16_pages) -- positions < n_stored are
    stored; full non-sink pages are committed; pages in fp16_pages get an fp16 slot.
    Returns (cache, page_table [B, max_pages]).
    """
    g, h, d = config.page_size, requests[0][0].shape[1], config.head_dim
    counts = [-(-n // g) for _, _, n, _ in requests]
    total = sum(counts) + 1
    ids = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    packed = torch.zeros(total, h, config.page_bytes, dtype=torch.uint8)
    slots = sum(len(s) for *_, s in requests)
    slot_k = torch.zeros(slots, g, h, d, dtype=torch.float16)
    slot_v = torch.zeros_like(slot_k)
    page_slot = torch.full((total,), -1, dtype=torch.long)
    table = torch.zeros(len(requests), max(counts), dtype=torch.long)
    nxt, free_slot = 0, 0
    for b, (k, v, n, fp16_pages) in enumerate(requests):
        for j in range(counts[b]):
            pid = int(ids[nxt])
            nxt += 1
            table[b, j] = pid
            lo, hi = j * g, min(n, (j + 1) * g)
            if hi - lo == g and j >= config.sink_pages:
                packed[pid] = quantize_pages(k[lo:hi][None], v[lo:hi][None], config)[0]
            if j in fp16_pages:
                slot_k[free_slot, : hi - lo] = k[lo:hi].half()
                slot_v[free_slot, : hi - lo] = v[lo:hi].half()
                page_slot[pid] = free_slot
                free_slot += 1
    cache = PagedKVCache(packed, slot_k, slot_v, page_slot)
    moved = PagedKVCache(*(t.to(device) for t in (packed, slot_k, slot_v, page_slot)))
    return (moved if device != "cpu" else cache), table.to(device)


def covers_every_pair(cases: list[tuple], *values: list) -> bool:
    """Whether ``cases`` hold every pair of values of any two parameters (``values[i]`` are
    the values of parameter i): a covering array that keeps every code path of a kernel
    whose paths depend on at most two parameters at once, at a fraction of the product."""
    for i, j in itertools.combinations(range(len(values)), 2):
        have = {(c[i], c[j]) for c in cases}
        if not set(itertools.product(values[i], values[j])) <= have:
            return False
    return True


def fp16(x):
    return x.half().float()


def device() -> str:
    """Where kernel tests run: the GPU when there is one, else the Triton interpreter on CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
