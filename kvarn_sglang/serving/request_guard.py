"""Isolating a request whose K/V turn non-finite (NaN or Inf) without stopping the batch.

A forward pass serves every request of a batch together. A NaN or Inf in one request's new K
or V (an fp16/bf16 overflow of its K projection on one token, a corrupted weight row) used to
make the page commit raise inside the pass, after earlier layers had committed, and the
scheduler died with every request. Instead, in every layer of every pass (eager and CUDA-graph
alike: device operations only, no host branch):

1. ``screen``: each new token whose K or V holds a non-finite value is stored as zeros, so no
   fp16 slot (the scratch slot included) ever holds NaN/Inf and the request's own attention,
   logits and sampling stay finite; its batch row records the first such layer
   (``ForwardPlan.bad_layer``);
2. ``pages_to_commit``: the pages the pass completes for a flagged row are not committed (page 0
   stands in for them, and every commit skips page 0), so no quantized record is made from it.

After the pass the scheduler (``kvarn_sglang.patches.scheduler``) reads the flags
(``flagged_rows``, one small device-to-host copy per pass), withdraws the slot releases that
were scheduled for the uncommitted pages (``keep_uncommitted_slots``: a page the pass did not
commit keeps its slot until it is freed), and finishes each flagged request through SGLang's
own abort path: an error to the client, its output dropped, its KV never inserted into the
radix cache, its pages and slots freed. A pass writes only its requests' private pages, so no
cached page changes, and the other requests of the batch go on.
"""

from __future__ import annotations

import torch

from kvarn_sglang.serving.forward_plan import CLEAN, ForwardPlan


def screen(
    k: torch.Tensor, v: torch.Tensor, plan: ForwardPlan, layer_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the tokens of ``k, v [N, H, D]`` that hold a non-finite value and record
    ``layer_id`` for their batch rows in ``plan.bad_layer`` (the smallest layer wins).

    Returns the screened ``k, v`` (new tensors; the inputs are not modified).
    """
    bad = ~(torch.isfinite(k).flatten(1).all(1) & torch.isfinite(v).flatten(1).all(1))
    k = k.masked_fill(bad[:, None, None], 0)
    v = v.masked_fill(bad[:, None, None], 0)
    hit = torch.where(bad, layer_id, CLEAN).to(torch.int32)
    plan.bad_layer.scatter_reduce_(0, plan.token_rows, hit, reduce="amin")
    return k, v


def pages_to_commit(pages: torch.Tensor, rows: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
    """``pages [M]`` (of batch rows ``rows [M]``) with page 0 in place of every page of a
    flagged row: the pages a layer may commit."""
    return torch.where(plan.bad_layer[rows] == CLEAN, pages, torch.zeros_like(pages))


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
