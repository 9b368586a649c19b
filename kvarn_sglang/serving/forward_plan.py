"""One forward pass's page decisions (``pages.pass_pages``) as device tensors.

``build_plan`` turns the host-side decision of which pages a pass commits, from their fp16
slots or straight from the new tokens, into page ids gathered from SGLang's request-to-token
table on the device, with the page table the attention reads. Planning reads only host
lengths and gathers page ids on the device: no host synchronisation.

The plan also says which batch row each new token and each completed page belongs to, so
that a request whose K/V turn non-finite can be isolated (``request_guard``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvarn_sglang.serving.pages import pass_pages

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
        prefix_cpu, extend_cpu: the host lengths the plan was made from (extend passes).
        extend_blocks: the extend kernel's block tables of this pass by GQA ratio, made from
            the host lengths by the first layer that needs them (``extend_blocks_for``) and
            reused by every other layer: no layer reads a length back from the device.
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
    prefix_cpu: list[int] = field(default_factory=list)
    extend_cpu: list[int] = field(default_factory=list)
    extend_blocks: dict = field(default_factory=dict)

    def extend_blocks_for(self, config, group: int):
        """The pass's ``kernels.extend.ExtendBlocks`` for GQA ratio ``group`` (built once)."""
        if group not in self.extend_blocks:
            from kvarn_sglang.kernels.extend import extend_blocks

            self.extend_blocks[group] = extend_blocks(
                self.prefix_cpu, self.extend_cpu, config, group, self.page_table.device
            )
        return self.extend_blocks[group]


def page_table_of(
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, max_pages: int, page_size: int
) -> torch.Tensor:
    """``int64 [B, max_pages]``: the page id of every page of each request's row."""
    first_tokens = req_to_token[:, : max_pages * page_size : page_size]  # a view
    return first_tokens[req_pool_indices.long()].long() // page_size


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
    pages = pass_pages(prefix_lens, seq_lens, page_size, sink_pages)
    g, dev = page_size, req_to_token.device
    max_pages = max((-(-s // g) for s in seq_lens), default=1)
    page_table = page_table_of(req_to_token, req_pool_indices, max_pages, g)
    from_slots, direct, direct_rows = pages.from_slots, pages.direct, pages.direct_rows

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
        prefix_cpu=list(prefix_lens),
        extend_cpu=extend,
    )
