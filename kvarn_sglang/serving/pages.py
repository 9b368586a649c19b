"""A KVarN page's life, and what one forward pass does to every page it touches.

A page id (SGLang's ``token_slot // page_size``) owns one packed record per layer and KV
head; while it is filling, and for good if it is a sink page, it also owns an fp16 slot (the
same slot id in every layer). Slot lifetime follows page lifetime:

1. **slot assigned**: the allocator (``allocator.KVarNPagedAllocator.alloc_*``) allocates the
   page and, if it is a sink page or stays partial after the pass, gives it a slot
   (``PageStore.assign_slots``), on the scheduler's side, before any kernel writes to it; a
   page filled entirely by one pass never takes a slot;
2. **written**: every layer stores the pass's new tokens in the slot (``PageStore.write``,
   through the pool's ``set_kv_buffer``);
3. **committed**: in the pass where its last token is written, every layer quantizes it once
   into its packed record, before that layer's attention reads it (``PageStore.commit_slots``
   from its slot, or ``PageStore.commit`` straight from the pass's new tokens);
4. **slot released**: the backend's ``_begin_pass`` schedules the release of the slots of the
   pages the pass commits from slots; they return to the free stack when the next pass or
   allocation starts (``PageStore.flush_released``), after the pass that still read them;
   sink pages keep theirs; a page that the pass did not commit after all (its request wrote
   non-finite K/V, ``request_guard``) keeps its slot (``PageStore.keep_slots``);
5. **page freed**: the allocator frees the page (request teardown, radix eviction, a
   duplicate found on insert) and ``PageStore.forget_pages`` takes back a slot it still holds.

This module makes the decisions of steps 1 and 3 for a pass, from host lengths alone, and
both the allocator and the forward plan (``forward_plan.build_plan``, the backend's graph
decode) call it: ``pass_pages``. For request i with ``prefix`` tokens already cached and
``seq`` tokens after the pass, the new tokens fall in pages ``prefix // G .. (seq - 1) // G``.
A page is *completed* in the pass when its last token is written in it; pages past the sink
pages are then committed:

* a completed page that started in an earlier pass (a partial prefix page, or the page a
  decode step fills) holds its tokens in an fp16 slot: commit from the slot
  (``from_slots``), release the slot after the pass;
* a completed page made entirely of this pass's tokens is committed straight from the new
  K/V (``direct``; its own tokens read themselves from the new K/V as well);
* every other page that receives tokens and is new in this pass (the last, partial page; a
  sink page) needs a new slot (``new_slot_rows``; ``new_sink_rows`` for sink pages).

So a request holds at most ``sink_pages + 1`` slots between passes. While a pass runs it can
hold one more (``filling_slots``): a pass that starts inside a non-sink page and ends inside a
later one opens the new page's slot before the slot of the page it completes comes back. A
decode step adds one token and never does; a continued chunk of a chunked prefill does, as
SGLang cuts continuation chunks anywhere (``--enable-mixed-chunk`` lowers the chunk by the
running requests, a short memory budget lowers it too). The slot budget reserves that second
filling page for every request prefilled in chunks (``slot_budget``).
"""

from __future__ import annotations

from dataclasses import dataclass


def _check_lengths(prefix_lens: list[int], seq_lens: list[int]) -> None:
    if len(prefix_lens) != len(seq_lens) or any(
        not 0 <= p < s for p, s in zip(prefix_lens, seq_lens, strict=True)
    ):
        raise ValueError(f"Invalid lengths: prefix {prefix_lens}, seq {seq_lens}")


def sink_page_range(prefix_len: int, total_len: int, page_size: int, sink_pages: int):
    """Page indices of a request's sink pages: ``(cached, new)`` ranges, ``cached`` covered by
    its matched prefix of ``prefix_len`` tokens, ``new`` allocated when ``total_len`` tokens
    are filled."""
    if prefix_len < 0 or total_len < prefix_len:
        raise ValueError(f"Invalid lengths: prefix {prefix_len}, total {total_len}")
    g = page_size
    covered = min(sink_pages, -(-prefix_len // g))
    needed = min(sink_pages, -(-total_len // g))
    return range(covered), range(covered, max(covered, needed))


@dataclass(frozen=True)
class PassPages:
    """What one pass does to the pages it touches (see the module docstring).

    Rows count the pass's new tokens, requests concatenated; pages are ``(batch row, page
    index within the request)`` pairs.

    Attributes:
        new_slot_rows: rows of the first token of every page that needs a new fp16 slot.
        new_sink_rows: the rows among ``new_slot_rows`` that start a sink page.
        from_slots: completed non-sink pages committed from their fp16 slots.
        direct: completed non-sink pages committed from the pass's new tokens.
        direct_rows: ``direct_rows[i]``, the G rows of the new tokens filling ``direct[i]``.
    """

    new_slot_rows: list[int]
    new_sink_rows: list[int]
    from_slots: list[tuple[int, int]]
    direct: list[tuple[int, int]]
    direct_rows: list[list[int]]


def pass_pages(
    prefix_lens: list[int], seq_lens: list[int], page_size: int, sink_pages: int
) -> PassPages:
    """Decide, from host lengths, what a pass does to every page it touches.

    Args:
        prefix_lens, seq_lens: tokens of each request before and after the pass.
        page_size: G; sink_pages: fp16 sink pages at the start of every sequence.
    """
    _check_lengths(prefix_lens, seq_lens)
    g = page_size
    slot_rows, sink_rows, from_slots, direct, direct_rows = [], [], [], [], []
    row0 = 0
    for b, (p, s) in enumerate(zip(prefix_lens, seq_lens, strict=True)):
        for j in range(-(-p // g), (s - 1) // g + 1):  # pages new in this pass
            if j < sink_pages or (j + 1) * g > s:
                slot_rows.append(row0 + j * g - p)
        sink_rows += [row0 + j * g - p for j in sink_page_range(p, s, g, sink_pages)[1]]
        for j in range(max(p // g, sink_pages), s // g):  # completed non-sink pages
            if j * g < p:
                from_slots.append((b, j))
            else:
                direct.append((b, j))
                direct_rows.append(list(range(row0 + j * g - p, row0 + (j + 1) * g - p)))
        row0 += s - p
    return PassPages(slot_rows, sink_rows, from_slots, direct, direct_rows)


def filling_slots(prefix_len: int, seq_len: int, page_size: int, sink_pages: int) -> int:
    """Non-sink fp16 slots one request holds while a pass from ``prefix_len`` to ``seq_len``
    tokens runs: the partial non-sink page it was filling (held from an earlier pass; if the
    pass completes it, its slot comes back only after the pass) plus the non-sink pages the
    pass gives a new slot (``pass_pages``). At most 2, and 2 only for a pass that starts inside
    a non-sink page and ends inside a later one."""
    g = page_size
    held = int(prefix_len % g != 0 and prefix_len // g >= sink_pages)
    pages = pass_pages([prefix_len], [seq_len], g, sink_pages)
    return held + len(pages.new_slot_rows) - len(pages.new_sink_rows)
