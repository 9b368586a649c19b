"""Isolating a request whose K/V turn non-finite (NaN or Inf) without stopping the batch.

A forward pass serves every request of a batch together. A NaN or Inf in one request's new K
or V (an fp16/bf16 overflow of its K projection on one token, a corrupted weight row) used to
make the page commit raise inside the pass, after earlier layers had committed, and the
scheduler died with every request. Instead, in every layer of every pass (eager and CUDA-graph
alike: device operations only, no host branch):

1. ``screen``: each new token whose K or V holds a non-finite value, or values so large that
   no page could hold them, is stored as zeros, so no fp16 slot (the scratch slot included)
   ever holds NaN/Inf and the request's own attention, logits and sampling stay finite; its
   batch row records the first such layer (``ForwardPlan.bad_layer``);
2. ``pages_to_commit``: the pages the pass completes for a flagged row are not committed (page 0
   stands in for them, and every commit skips page 0), so no quantized record is made from it;
3. ``guard_scales``: smaller finite K/V can still be beyond what a page's fp16 metadata holds
   (a bf16 model's K above about 1e10: the normalization absorbs e^10 per token and channel);
   every record a layer commits is checked, one whose scales are not finite gets all-zero
   scales (it reads as zeros) and flags its row like a non-finite K/V.

After the pass the scheduler (``kvarn_sglang.patches.scheduler``) reads the flags
(``flagged_rows``, one small device-to-host copy per pass), withdraws the slot releases that
were scheduled for the uncommitted pages (``keep_uncommitted_slots``: a page the pass did not
commit keeps its slot until it is freed), and finishes each flagged request through SGLang's
own abort path: an error to the client, its output dropped, its KV never inserted into the
radix cache, its pages and slots freed. A pass writes only its requests' private pages, so no
cached page changes, and the other requests of the batch go on.
"""

from __future__ import annotations

import math

import torch
from torch.linalg import vector_norm

from kvarn_sglang.format.numerics import PAGE_VALUE_MAX
from kvarn_sglang.serving.forward_plan import CLEAN, ForwardPlan


def screen(
    k: torch.Tensor, v: torch.Tensor, plan: ForwardPlan, layer_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the tokens of ``k, v [N, H, D]`` that hold a non-finite value, or a head whose
    values no page could hold (L2 norm beyond ``PAGE_VALUE_MAX * sqrt(D)``), and record
    ``layer_id`` for their batch rows in ``plan.bad_layer`` (the smallest layer wins).

    Returns the screened ``k, v`` (new tensors; the inputs are not modified).
    """
    # NaN fails the comparison; Inf and finite values no page's scales can hold exceed it.
    limit = PAGE_VALUE_MAX * math.sqrt(k.shape[-1])
    fits = (vector_norm(k, dim=-1, dtype=torch.float32) <= limit).all(1)
    bad = ~(fits & (vector_norm(v, dim=-1, dtype=torch.float32) <= limit).all(1))
    k = k.masked_fill(bad[:, None, None], 0)
    v = v.masked_fill(bad[:, None, None], 0)
    hit = torch.where(bad, layer_id, CLEAN).to(torch.int32)
    plan.bad_layer.scatter_reduce_(0, plan.token_rows, hit, reduce="amin")
    return k, v


def pages_to_commit(pages: torch.Tensor, rows: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
    """``pages [M]`` (of batch rows ``rows [M]``) with page 0 in place of every page of a
    flagged row: the pages a layer may commit."""
    return torch.where(plan.bad_layer[rows] == CLEAN, pages, torch.zeros_like(pages))


def guard_scales(
    store, layer: int, pages: torch.Tensor, rows: torch.Tensor, plan: ForwardPlan, layer_id: int
) -> None:
    """After ``layer`` committed ``pages [M]`` (of batch rows ``rows [M]``): a page whose
    fp16 scales cannot hold its values (``PageStore.check_scales``; its scales are zeroed)
    flags its row with ``layer_id``, as a non-finite K/V does."""
    ok = store.check_scales(layer, pages)
    hit = torch.where(ok, CLEAN, layer_id).to(torch.int32)
    plan.bad_layer.scatter_reduce_(0, rows, hit, reduce="amin")


def flagged_rows(plan: ForwardPlan, batch_size: int, group=None) -> dict[int, int]:
    """``{batch row: first bad layer}`` of the first ``batch_size`` rows of a pass that has
    run. With ``group`` (a CPU process group: the tensor-parallel ranks, which hold different
    KV heads of the same requests), the ranks agree on the union of their flags."""
    bad = plan.bad_layer[:batch_size].to("cpu")
    if group is not None:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN, group=group)
    return {row: layer for row, layer in enumerate(bad.tolist()) if layer != CLEAN}


def keep_uncommitted_slots(store, plan: ForwardPlan, rows: list[int]) -> None:
    """The pages of ``rows`` that the pass was to commit from their fp16 slots were not
    committed: withdraw their scheduled slot releases (``PageStore.keep_slots``), so they
    hold their slots until the allocator frees them."""
    flagged = torch.tensor(rows, dtype=torch.long, device=plan.slot_commit_rows.device)
    mask = torch.isin(plan.slot_commit_rows, flagged)
    store.keep_slots(plan.slot_commits[mask])
