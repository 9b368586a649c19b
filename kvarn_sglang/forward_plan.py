"""What one forward pass does to KVarN pages: which get fp16 slots, which get committed.

For request i with ``prefix`` tokens already cached and ``seq`` tokens after this pass, the
new tokens fall in pages ``prefix // G .. (seq - 1) // G``. A page is *completed* in this pass
when its last token is written in it. Pages past the sink pages are committed (quantized
once), in every layer, before that layer's attention reads them:

* a completed page that started in an earlier pass (a partial prefix page, or the page a
  decode step fills) holds its tokens in an fp16 slot: write, commit from the slot, and
  release the slot after the pass (``slot_commits``);
* a completed page entirely made of this pass's tokens needs no slot: it is committed
  straight from the new K/V (``direct_pages``, rows ``direct_rows`` of the pass's tokens);
  its own tokens read themselves from the new K/V as well;
* every other page that receives tokens (the last, partial page; sink pages) needs a slot.
  Such a page is new in this pass, so the allocator gives it its slot when it allocates it
  (``slot_positions``).

So a request holds at most ``sink_pages + 1`` slots between passes. Planning reads only host
lengths and gathers page ids on the device: no host synchronisation.

The plan also says which batch row each new token and each completed page belongs to, so
that a request whose K/V turn non-finite can be isolated (``kvarn_sglang.request_guard``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# ``ForwardPlan.bad_layer`` of a row that wrote only finite K/V.
CLEAN = torch.iinfo(torch.int32).max


def clean_rows(batch_size: int, device) -> torch.Tensor:
    """``int32 [batch_size]`` filled with ``CLEAN``: no row has written non-finite K/V."""
    return torch.full((batch_size,), CLEAN, dtype=torch.int32, device=device)


@dataclass
class ForwardPlan:
    """Page bookkeeping of one forward pass.

    Attributes:
        page_table: ``int64 [B, max_pages]`` page ids of each request, in order.
        prefix_lens, extend_lens, seq_lens: ``int64 [B]`` on the device.
        slot_commits: ``int64 [M]`` completed non-sink pages committed from their slots
            (their slots are released after the pass). In CUDA-graph replay the list is
            padded with page 0, whose slot is the scratch slot.
        direct_pages: ``int64 [P]`` completed non-sink pages committed from the new tokens.
        direct_rows: ``int64 [P, G]`` rows of the pass's new tokens filling each of them.
        in_graph: the pass is captured or replayed in a CUDA graph: slot releases were
            already scheduled before the replay.
        token_rows: ``int64 [N]`` batch row of each of the pass's new tokens.
        slot_commit_rows: ``int64 [M]`` batch row of each ``slot_commits`` page.
        direct_page_rows: ``int64 [P]`` batch row of each ``direct_pages`` page.
        bad_layer: ``int32 [B]`` first layer in which a row wrote non-finite K/V, or
            ``CLEAN`` (filled by the layers of the pass).
    """

    page_table: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    seq_lens: torch.Tensor
    slot_commits: torch.Tensor
    direct_pages: torch.Tensor
    direct_rows: torch.Tensor
    token_rows: torch.Tensor
    slot_commit_rows: torch.Tensor
    direct_page_rows: torch.Tensor
    bad_layer: torch.Tensor
    in_graph: bool = False


def _check_lengths(prefix_lens: list[int], seq_lens: list[int]) -> None:
    if len(prefix_lens) != len(seq_lens) or any(
        not 0 <= p < s for p, s in zip(prefix_lens, seq_lens, strict=True)
    ):
        raise ValueError(f"Invalid lengths: prefix {prefix_lens}, seq {seq_lens}")


def slot_positions(
    prefix_lens: list[int], seq_lens: list[int], page_size: int, sink_pages: int
) -> list[int]:
    """Rows, among the pass's new tokens (requests concatenated), of the first token of
    every page that needs a new fp16 slot: new pages that are sink pages or stay partial."""
    _check_lengths(prefix_lens, seq_lens)
    g, rows, row0 = page_size, [], 0
    for p, s in zip(prefix_lens, seq_lens, strict=True):
        for j in range(-(-p // g), (s - 1) // g + 1):
            if j < sink_pages or (j + 1) * g > s:
                rows.append(row0 + j * g - p)
        row0 += s - p
    return rows


def page_table_of(
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, max_pages: int, page_size: int
) -> torch.Tensor:
    """``int64 [B, max_pages]``: the page id of every page of each request's row."""
    first_tokens = req_to_token[:, : max_pages * page_size : page_size]  # a view
    return first_tokens[req_pool_indices.long()].long() // page_size


def completed_pages(
    prefix_lens: list[int], seq_lens: list[int], page_size: int, sink_pages: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[list[int]]]:
    """The completed non-sink pages of a pass, as ``(batch row, page index)`` pairs:
    ``(from_slots, direct, direct_rows)`` (see the module docstring); ``direct_rows[i]`` are
    the rows of the pass's new tokens filling ``direct[i]``."""
    g, from_slots, direct, direct_rows, row0 = page_size, [], [], [], 0
    for b, (p, s) in enumerate(zip(prefix_lens, seq_lens, strict=True)):
        for j in range(max(p // g, sink_pages), s // g):
            if j * g < p:
                from_slots.append((b, j))
            else:
                direct.append((b, j))
                direct_rows.append(list(range(row0 + j * g - p, row0 + (j + 1) * g - p)))
        row0 += s - p
    return from_slots, direct, direct_rows


def gather_pages(page_table: torch.Tensor, at: list[tuple[int, int]]) -> torch.Tensor:
    """``int64 [len(at)]``: the page ids at ``(batch row, page index)`` pairs of a table."""
    if not at:
        return page_table.new_zeros(0)
    idx = torch.tensor(at, dtype=torch.long).to(page_table.device, non_blocking=True)
    return page_table[idx[:, 0], idx[:, 1]]


def build_plan(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: list[int],
    seq_lens: list[int],
    page_size: int,
    sink_pages: int,
) -> ForwardPlan:
    """Plan a pass from SGLang's request-to-token table.

    Args:
        req_to_token: ``int [num_rows, max_context]`` token slot ids per request row.
        req_pool_indices: ``int [B]`` rows of this batch.
        prefix_lens, seq_lens: host lists, tokens before and after this pass per request.
    """
    _check_lengths(prefix_lens, seq_lens)
    g, dev = page_size, req_to_token.device
    max_pages = max((-(-s // g) for s in seq_lens), default=1)
    page_table = page_table_of(req_to_token, req_pool_indices, max_pages, g)
    from_slots, direct, direct_rows = completed_pages(prefix_lens, seq_lens, g, sink_pages)

    def as_dev(xs) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long).to(dev, non_blocking=True)

    extend = [s - p for p, s in zip(prefix_lens, seq_lens, strict=True)]
    token_rows = torch.repeat_interleave(torch.arange(len(extend)), torch.tensor(extend))
    return ForwardPlan(
        page_table=page_table,
        prefix_lens=as_dev(prefix_lens),
        extend_lens=as_dev(extend),
        seq_lens=as_dev(seq_lens),
        slot_commits=gather_pages(page_table, from_slots),
        direct_pages=gather_pages(page_table, direct),
        direct_rows=as_dev(direct_rows).view(-1, g),
        token_rows=token_rows.to(dev, non_blocking=True),
        slot_commit_rows=as_dev([b for b, _ in from_slots]),
        direct_page_rows=as_dev([b for b, _ in direct]),
        bad_layer=clean_rows(len(extend), dev),
    )
