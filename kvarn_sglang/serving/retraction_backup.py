"""A request's KVarN pages in host memory and back: retraction on a PD decode server.

A PD decode server cannot recompute a retracted request's prompt (the prefill server did),
so SGLang copies its KV to host memory when it retracts it
(``--disaggregation-decode-retraction-backup cpu_tensor``: ``Req.offload_kv_cache`` calls the
pool's ``get_cpu_copy`` with the request's token slots), frees its pages, and when it resumes
the request allocates pages again and calls ``load_cpu_copy`` with the new token slots.

With KVarN a request's pages are of two kinds (``pages``): pages holding an fp16 slot (its sink
pages and its partial last page) and packed pages. ``backup_pages`` copies the slot of the
first kind and the packed record of the second, never re-quantizing anything;
``restore_pages`` writes them back. The pages that get slots on resumption are decided by the
same rule from the same length (the allocator's ``alloc_extend``), so the slot pages line up;
``restore_pages`` checks that they do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PageBackup:
    """Host copy of one request's pages.

    Attributes:
        num_tokens: tokens backed up (the request's token slots).
        slot_positions: page positions (within the request) of the pages that held a slot.
        packed: per layer ``uint8 [P, H, page_bytes]``, the records of the other pages.
        slot_k, slot_v: per layer ``[S, G, H, D]``, the slots of ``slot_positions``.
    """

    num_tokens: int
    slot_positions: list[int]
    packed: list[torch.Tensor]
    slot_k: list[torch.Tensor]
    slot_v: list[torch.Tensor]


def _pages_of(store, indices: torch.Tensor) -> torch.Tensor:
    g = store.config.page_size
    return indices[::g].to(torch.long) // g


def backup_pages(store, indices: torch.Tensor) -> PageBackup:
    """Copy the pages at token slots ``indices [N]`` (one request's, in order) to the host."""
    store.flush_released()
    pages = _pages_of(store, indices)
    slots = store.page_slot[pages]
    has_slot = slots != store.scratch
    packed_pages, slot_ids = pages[~has_slot], slots[has_slot]
    return PageBackup(
        num_tokens=len(indices),
        slot_positions=torch.nonzero(has_slot).flatten().tolist(),
        packed=[t[packed_pages].cpu() for t in store.packed],
        slot_k=[t[slot_ids].cpu() for t in store.slot_k],
        slot_v=[t[slot_ids].cpu() for t in store.slot_v],
    )


def restore_pages(store, backup: PageBackup, indices: torch.Tensor) -> None:
    """Write ``backup`` into the pages now at token slots ``indices``, which the allocator just
    gave the resumed request (with slots for its sink pages and its partial last page)."""
    if len(indices) != backup.num_tokens:
        raise RuntimeError(
            f"KVarN retraction: {backup.num_tokens} tokens were backed up but {len(indices)} "
            f"are restored"
        )
    store.flush_released()
    pages = _pages_of(store, indices)
    slots = store.page_slot[pages]
    has_slot = slots != store.scratch
    positions = torch.nonzero(has_slot).flatten().tolist()
    if positions != backup.slot_positions:
        raise RuntimeError(
            f"KVarN retraction: the resumed request's fp16 pages {positions} differ from the "
            f"backed-up ones {backup.slot_positions}"
        )
    packed_pages, slot_ids = pages[~has_slot], slots[has_slot]
    for layer, records in enumerate(backup.packed):
        store.packed[layer][packed_pages] = records.to(store.packed[layer].device)
    for layer, (k, v) in enumerate(zip(backup.slot_k, backup.slot_v, strict=True)):
        store.slot_k[layer][slot_ids] = k.to(store.slot_k[layer].device)
        store.slot_v[layer][slot_ids] = v.to(store.slot_v[layer].device)
