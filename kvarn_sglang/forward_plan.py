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

So a request holds at most ``sink_pages + 1`` slots between passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardPlan:
    """Page bookkeeping of one forward pass.

    Attributes:
        page_table: ``int64 [B, max_pages]`` page ids of each request, in order.
        prefix_lens, extend_lens, seq_lens: ``int64 [B]`` on the device.
        slot_pages: ``int64 [K]`` pages that must hold an fp16 slot before the writes.
        slot_commits: ``int64 [M]`` completed non-sink pages committed from their slots
            (released after the pass).
        direct_pages: ``int64 [P]`` completed non-sink pages committed from the new tokens.
        direct_rows: ``int64 [P, G]`` rows of the pass's new tokens filling each of them.
    """

    page_table: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    seq_lens: torch.Tensor
    slot_pages: torch.Tensor
    slot_commits: torch.Tensor
    direct_pages: torch.Tensor
    direct_rows: torch.Tensor


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
    g, dev = page_size, req_to_token.device
    if len(prefix_lens) != len(seq_lens) or any(
        not 0 <= p < s for p, s in zip(prefix_lens, seq_lens, strict=True)
    ):
        raise ValueError(f"Invalid lengths: prefix {prefix_lens}, seq {seq_lens}")
    max_pages = max((-(-s // g) for s in seq_lens), default=1)
    rows = req_to_token[req_pool_indices.long()]
    page_table = (rows[:, : max_pages * g : g].long() // g).contiguous()
    table = page_table.tolist()
    slot_pages, slot_commits, direct_pages, direct_rows = [], [], [], []
    row0 = 0
    for b, (p, s) in enumerate(zip(prefix_lens, seq_lens, strict=True)):
        for j in range(p // g, (s - 1) // g + 1):
            started_before = j * g < p
            completed = (j + 1) * g <= s
            if completed and j >= sink_pages:
                if started_before:
                    slot_pages.append(table[b][j])
                    slot_commits.append(table[b][j])
                else:
                    direct_pages.append(table[b][j])
                    direct_rows.append(range(row0 + j * g - p, row0 + (j + 1) * g - p))
            else:
                slot_pages.append(table[b][j])
        row0 += s - p

    def as_dev(xs) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.long, device=dev)

    return ForwardPlan(
        page_table=page_table,
        prefix_lens=as_dev(prefix_lens),
        extend_lens=as_dev([s - p for p, s in zip(prefix_lens, seq_lens, strict=True)]),
        seq_lens=as_dev(seq_lens),
        slot_pages=as_dev(slot_pages),
        slot_commits=as_dev(slot_commits),
        direct_pages=as_dev(direct_pages),
        direct_rows=as_dev([list(r) for r in direct_rows]).view(-1, g),
    )
