"""KVarN pages over SGLang's PD disaggregation: what a prefill server hands a decode server.

A request's KV travels in two parts, both described to SGLang's transfer engines (mooncake,
NIXL) as plain byte regions indexed by an id:

* **packed pages**: one region per layer, ``PageStore.packed[layer]`` (``uint8 [num_pages,
  H, page_bytes]``), indexed by page id, an item being one page of every KV head
  (``packed_buffer_infos``); every region carries its model layer id (``layer_ids``), so the
  engines pair prefill and decode regions by layer rather than by position. A page past the
  sink that is complete was committed (quantized) once, on the prefill server; the decode
  server receives its record as it is and never quantizes it again.
* **fp16 slots**: a request's sink pages and its partial last page live in fp16 slots
  (``pages`` draws a page's life). They travel as a *state component*, the way SGLang's
  hybrid models send their recurrent state: regions ``slot_k[layer]`` then ``slot_v[layer]``
  (``[num_slots + 1, G, H, D]``), indexed by slot id (``slot_buffer_infos``). Both servers
  list, in page order, the slots of the same pages of the request (``fp16_page_positions``,
  ``request_slots``): the prefill server those its pages hold, the decode server those its
  allocator gave the preallocated pages (``KVarNPagedAllocator.alloc_extend`` decides from the
  same lengths, with the same ``pages.pass_pages``).

The fp16 pages' packed records (never written) do not travel: both servers leave those pages
out of the packed page lists (``packed_page_mask``), so a request moves exactly its fp16
pages in fp16 and every other page packed.

Both servers must store pages alike: same preset, page size, sink pages, head_dim and slot
dtype. The prefill server publishes ``pd_layout`` at its bootstrap server; the decode server
compares it with its own at the first handshake with that prefill server and refuses the
request with ``layout_mismatch``'s message (``kvarn_sglang.patches.disaggregation``).
"""

from __future__ import annotations

import torch

from kvarn_sglang.format.config import KVarNConfig

LAYOUT_PREFIX = "kvarn"
# Layout fields, in the order they are published, with the flag that sets each.
_LAYOUT_FLAGS = {
    "preset": "--kvarn-preset",
    "page_size": "--page-size",
    "sink_pages": "--kvarn-sink-pages",
    "head_dim": "the model's head_dim",
    "slot_dtype": "--dtype",
}


def packed_buffer_infos(store) -> tuple[list[int], list[int], list[int]]:
    """``(data_ptrs, data_lens, item_lens)`` of the packed page regions, one per layer; an
    item is one page id's record of every KV head (``H * page_bytes`` bytes)."""
    ptrs = [t.data_ptr() for t in store.packed]
    lens = [t.nbytes for t in store.packed]
    items = [t[0].nbytes for t in store.packed]
    return ptrs, lens, items


def slot_buffer_infos(store) -> tuple[list[int], list[int], list[int]]:
    """``(data_ptrs, data_lens, item_lens)`` of the fp16 slot regions: every layer's K slots,
    then every layer's V slots; an item is one slot (``G * H * D`` elements)."""
    tensors = [*store.slot_k, *store.slot_v]
    return (
        [t.data_ptr() for t in tensors],
        [t.nbytes for t in tensors],
        [t[0].nbytes for t in tensors],
    )


def layer_ids(num_layers: int, start_layer: int) -> list[int]:
    """Model layer id of each packed region (``packed_buffer_infos``)."""
    return list(range(start_layer, start_layer + num_layers))


def slot_layer_ids(num_layers: int, start_layer: int) -> list[int]:
    """Model layer id of each slot region (``slot_buffer_infos``: K regions, then V)."""
    return layer_ids(num_layers, start_layer) * 2


def pd_layout(config: KVarNConfig, slot_dtype: torch.dtype) -> str:
    """What both PD servers must agree on, as one string (published by the prefill server)."""
    fields = {
        "preset": config.name,
        "page_size": config.page_size,
        "sink_pages": config.sink_pages,
        "head_dim": config.head_dim,
        "slot_dtype": str(slot_dtype).removeprefix("torch."),
    }
    return ";".join([LAYOUT_PREFIX, *(f"{k}={v}" for k, v in fields.items())])


def parse_layout(layout: str | None) -> dict[str, str] | None:
    """The fields of a ``pd_layout`` string; None if ``layout`` is not a KVarN layout."""
    if not layout or not layout.startswith(LAYOUT_PREFIX + ";"):
        return None
    return dict(part.split("=", 1) for part in layout.split(";")[1:])


def layout_mismatch(
    prefill: str | None, decode: str, prefill_dtype: str | None = None
) -> str | None:
    """Why a decode server with layout ``decode`` must not take KV from a prefill server that
    published ``prefill`` (and runs ``--kv-cache-dtype prefill_dtype``); None if it may."""
    ours, theirs = parse_layout(decode), parse_layout(prefill)
    if theirs is None:
        return (
            f"KVarN PD: the prefill server does not run --kv-cache kvarn (--kv-cache-dtype "
            f"{prefill_dtype or 'auto'}) but this decode server does "
            f"({_describe(ours)}); start both with the same --kv-cache kvarn flags"
        )
    diffs = [
        f"{flag}: prefill {theirs.get(key)}, decode {ours.get(key)}"
        for key, flag in _LAYOUT_FLAGS.items()
        if theirs.get(key) != ours.get(key)
    ]
    if not diffs:
        return None
    return (
        f"KVarN PD: the prefill and decode servers store pages differently ({'; '.join(diffs)}); "
        f"both must use the same --kvarn-preset, --page-size, --kvarn-sink-pages, model and "
        f"--dtype"
    )


def _describe(fields: dict[str, str] | None) -> str:
    if not fields:
        return "no KVarN"
    return ", ".join(f"{k} {v}" for k, v in fields.items())


def fp16_page_positions(start: int, total: int, page_size: int, sink_pages: int) -> list[int]:
    """Page positions, within a request, of the pages that travel fp16 when tokens ``[start,
    total)`` are handed over (``start`` page-aligned: the prefix the decode server already
    holds): its sink pages and its last page if partial, in page order."""
    if start < 0 or start % page_size or total <= start:
        raise ValueError(f"Invalid handover [{start}, {total}) with page size {page_size}")
    first, pages = start // page_size, -(-total // page_size)
    return [
        j for j in range(first, pages) if j < sink_pages or (j == pages - 1 and total % page_size)
    ]


def packed_page_mask(start: int, total: int, page_size: int, sink_pages: int) -> list[bool]:
    """For each page of ``[start, total)`` in order, whether it travels packed."""
    fp16 = set(fp16_page_positions(start, total, page_size, sink_pages))
    first, pages = start // page_size, -(-total // page_size)
    return [j not in fp16 for j in range(first, pages)]


def request_slots(store, row: torch.Tensor, positions: list[int], page_size: int) -> list[int]:
    """Slot ids of the pages at ``positions`` of a request whose token slots are ``row``
    (SGLang's ``req_to_token`` row); raises if one of them holds no slot."""
    if not positions:
        return []
    store.flush_released()
    index = torch.tensor(positions, dtype=torch.long, device=row.device) * page_size
    pages = row[index].to(torch.long) // page_size
    slots = store.page_slot[pages].tolist()
    missing = [p for p, s in zip(positions, slots, strict=True) if s == store.scratch]
    if missing:
        raise RuntimeError(
            f"KVarN PD: pages {missing} of the request hold no fp16 slot (sink pages and a "
            f"partial last page must)"
        )
    return slots
