"""Hook on ``sglang.srt.managers.scheduler.Scheduler.run_batch`` (sglang==0.5.23): after
every forward pass, finish the requests whose K/V turned non-finite in it (or too large for a
page's fp16 scales) with an error, and let the rest of the batch go on
(``kvarn_sglang.serving.request_guard`` draws the whole path).

It marks the flagged requests the way SGLang's ``run_batch`` marks requests whose external
KV load failed (``UnifiedRadixCache.finish_external_linker_loads``), so SGLang's own result
processing finishes them: ``skip_radix_cache_insert`` (their KV never reaches the radix
cache), ``discard_output_reason`` (an extend pass: the output is dropped, the KV released
without a checkpoint) or ``to_finish`` (a decode pass), and for the request being prefilled
in chunks ``_pending_chunked_abort_req`` (released before its next chunk is scheduled and
before it is stashed in the tree). The client gets the error (HTTP 500 when not streaming),
and one log line names the request and the layer.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from kvarn_sglang.serving.request_guard import flagged_rows, keep_uncommitted_slots

logger = logging.getLogger(__name__)

RUN_BATCH = "sglang.srt.managers.scheduler.Scheduler.run_batch"


def after_run_batch(result, self, batch, *args, **kwargs):
    pool = self.token_to_kv_pool_allocator.get_kvcache()
    pool = getattr(pool, "full_kv_pool", pool)  # a hybrid linear-attention model's KVarN pool
    plan = getattr(pool, "pass_plan", None)
    if plan is None:  # not a KVarN pool, or no pass planned since the last one was read
        return result
    pool.pass_plan = None
    group = self.tp_cpu_group if getattr(self, "tp_size", 1) > 1 else None
    flagged = flagged_rows(plan, len(batch.reqs), group=group)
    if flagged:
        keep_uncommitted_slots(pool.store, plan, list(flagged))
        for row, layer in flagged.items():
            abort_nonfinite(self, batch, batch.reqs[row], layer)
    return result


def abort_nonfinite(scheduler, batch, req, layer: int) -> None:
    """Finish ``req`` of ``batch`` with an error through SGLang's abort path: its K/V were
    non-finite from ``layer`` on (see the module docstring)."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    if req.finished() or req.is_retracted:
        return
    logger.error(
        "KVarN: request %s wrote non-finite K/V (NaN or Inf) in layer %d (or K/V beyond what "
        "a page's fp16 scales hold): aborting it; its pages are freed and never cached, the "
        "other requests of the batch continue",
        req.rid, layer,
    )  # fmt: skip
    reason = FINISH_ABORT(
        f"KVarN: the model produced non-finite K/V (NaN or Inf) for this request in layer "
        f"{layer} (or K/V beyond what a page's fp16 scales hold); the request was aborted",
        HTTPStatus.INTERNAL_SERVER_ERROR,
        "InternalServerError",
    )
    req.skip_radix_cache_insert = True
    if batch.forward_mode.is_decode():
        req.to_finish = reason
    else:
        req.discard_output_reason = reason
    if req is scheduler.chunked_req:
        scheduler._pending_chunked_abort_req = req
