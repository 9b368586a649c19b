"""Hooks on SGLang's PD disaggregation (``sglang.srt.disaggregation``, sglang==0.5.23): KVarN
pages from a prefill server to a decode server (``kvarn_sglang.serving.pd`` draws what moves).

Transfer layout (both roles, while the KV manager is built):

* ``build_kv_layer_ids`` (AFTER): the packed page regions of
  ``KVarNTokenToKVPool.get_contiguous_buf_infos`` carry their model layer ids, so mooncake and
  NIXL pair regions by layer (SGLang gives layer ids to hybrid pools only, and otherwise pairs a
  plain pool's regions as K halves and V halves, which one region per layer is not).
* ``setup_state_kv_args`` (AFTER): the fp16 slots become a state component
  (``StateType.REQUEST_ROW``: a request-indexed component that both engines move as whole,
  fixed-size items paired by position, with exact-length checks).
* ``get_pd_kv_layout`` (AFTER): the KV manager's ``kv_layout`` is ``pd.pd_layout``, which the
  prefill server publishes at its bootstrap server.

(``sglang.srt.disaggregation.utils`` functions, which ``prefill`` and ``decode`` import by name:
SGLang's hook registry patches those bindings too.)

Handshake (decode): ``CommonKVManager.try_ensure_parallel_info`` (AROUND) compares the prefill
server's layout with this server's, and turns SGLang's own mismatch errors (page size, KV
dtype, KV layout), which would stop the decode scheduler, into the same verdict;
``CommonKVReceiver.init``
(AROUND) then fails every request from a refused prefill server with a message naming both
values, and notifies the prefill server, which fails its side of the request too.

Per request:

* ``SchedulerDisaggregationPrefillMixin._send_kv_chunk`` (AROUND, prefill) and
  ``DecodePreallocQueue._transfer_page_indices`` (AROUND, decode): the packed page lists leave
  out the pages that travel fp16 (``pd.packed_page_mask``), and
  ``PrefillBootstrapQueue._num_pages_to_send`` (AROUND) counts the rest; the prefill server's
  slot component lists the slots of its fp16 pages, ``DecodePreallocQueue._send_kv_metadata``
  (AROUND) the decode server's (``pd.request_slots``).
* ``DecodePreallocQueue._required_admission_tokens`` and ``resume_retracted_reqs`` (AROUND):
  the decode server preallocates (or resumes) a request only if its fp16 slots will exist
  (``slot_budget``), as slot-aware admission does on a normal server; otherwise it waits.
"""

from __future__ import annotations

import logging

import numpy as np

from kvarn_sglang.serving.pages import sink_page_range
from kvarn_sglang.serving.pd import (
    fp16_page_positions,
    layout_mismatch,
    packed_page_mask,
    request_slots,
    slot_buffer_infos,
    slot_layer_ids,
)

logger = logging.getLogger(__name__)

_D = "sglang.srt.disaggregation"
# Module functions: SGLang's hook registry patches the defining module and every module that
# imported the function by name (prefill and decode), so each is hooked once, here.
BUILD_KV_LAYER_IDS = f"{_D}.utils.build_kv_layer_ids"
SETUP_STATE_KV_ARGS = f"{_D}.utils.setup_state_kv_args"
GET_PD_KV_LAYOUT = f"{_D}.utils.get_pd_kv_layout"
TRY_ENSURE_PARALLEL_INFO = f"{_D}.common.conn.CommonKVManager.try_ensure_parallel_info"
RECEIVER_INIT = f"{_D}.common.conn.CommonKVReceiver.init"
SEND_KV_CHUNK = f"{_D}.prefill.SchedulerDisaggregationPrefillMixin._send_kv_chunk"
NUM_PAGES_TO_SEND = f"{_D}.prefill.PrefillBootstrapQueue._num_pages_to_send"
TRANSFER_PAGE_INDICES = f"{_D}.decode.DecodePreallocQueue._transfer_page_indices"
SEND_KV_METADATA = f"{_D}.decode.DecodePreallocQueue._send_kv_metadata"
REQUIRED_ADMISSION_TOKENS = f"{_D}.decode.DecodePreallocQueue._required_admission_tokens"
RESUME_RETRACTED = f"{_D}.decode.DecodePreallocQueue.resume_retracted_reqs"
# A request the decode server must not admit now (slots short): more tokens than any pool.
_WAIT = 1 << 62


def _kvarn_pool(pool):
    """``pool`` if it is a KVarN pool, else None (no import of the pool module needed)."""
    return pool if getattr(pool, "kvarn_config", None) is not None else None


# ------------------------------------------------------------------ transfer layout
def after_build_kv_layer_ids(result, *args, **kwargs):
    pool = _kvarn_pool(kwargs.get("token_to_kv_pool"))
    return result if pool is None or result else pool.get_kv_layer_ids()


def after_setup_state_kv_args(result, kv_args, token_to_kv_pool, *args, **kwargs):
    pool = _kvarn_pool(token_to_kv_pool)
    if pool is None or getattr(kv_args, "kvarn_layout", None) is not None:
        return result
    from sglang.srt.disaggregation.base.conn import StateType
    from sglang.srt.disaggregation.utils import append_state_component

    ptrs, lens, items = slot_buffer_infos(pool.store)
    ids = slot_layer_ids(pool.layer_num, pool.start_layer)
    append_state_component(kv_args, StateType.REQUEST_ROW, ptrs, lens, items, layer_ids=ids)
    kv_args.kvarn_layout = pool.pd_kv_layout()
    return result


def after_get_pd_kv_layout(result, token_to_kv_pool, *args, **kwargs):
    pool = _kvarn_pool(token_to_kv_pool)
    return result if pool is None else pool.pd_kv_layout()


def _slot_component(kv_args) -> int | None:
    """Index of the KVarN slot component in ``kv_args.state_types`` (None without KVarN)."""
    if getattr(kv_args, "kvarn_layout", None) is None:
        return None
    from sglang.srt.disaggregation.base.conn import StateType

    found = [i for i, st in enumerate(kv_args.state_types) if st == StateType.REQUEST_ROW]
    if len(found) != 1:
        raise RuntimeError(f"KVarN PD: expected one slot component, found {len(found)}")
    return found[0]


# ------------------------------------------------------------------ handshake (decode)
def _fetch_prefill_info(bootstrap_addr: str):
    """The prefill server's ``PrefillServerInfo`` (what SGLang's check fetched), or None."""
    import requests
    from sglang.srt.disaggregation.common.conn import PrefillServerInfo

    url = (
        f"http://{bootstrap_addr}/route?prefill_dp_rank=-1&prefill_cp_rank=-1&"
        f"target_tp_rank=-1&target_pp_rank=-1"
    )
    try:
        response = requests.get(url, timeout=5)
        return PrefillServerInfo(**response.json()) if response.status_code == 200 else None
    except Exception:  # an unreachable peer: SGLang's retry path handles it
        return None


def _refusal(manager, info) -> str | None:
    problem = layout_mismatch(info.kv_layout, manager.kv_args.kvarn_layout, info.kv_cache_dtype)
    if problem is None and info.attn_tp_size != manager.attn_tp_size:
        problem = (
            f"KVarN PD: the prefill server splits attention over {info.attn_tp_size} ranks "
            f"(--tp-size) and this decode server over {manager.attn_tp_size}; KVarN pages "
            f"need the same split on both"
        )
    return problem


def around_try_ensure_parallel_info(original, self, bootstrap_addr: str):
    if getattr(self.kv_args, "kvarn_layout", None) is None:
        return original(self, bootstrap_addr)
    refusals = self.__dict__.setdefault("kvarn_refusals", {})
    if bootstrap_addr not in self.prefill_info_table:
        refusals.pop(bootstrap_addr, None)  # a restarted prefill server is checked afresh
    try:
        ready = original(self, bootstrap_addr)
    except RuntimeError as err:  # SGLang's page-size / KV-dtype checks: refuse the requests
        info = _fetch_prefill_info(bootstrap_addr)
        if info is None:
            return False
        refusals[bootstrap_addr] = _refusal(self, info) or str(err)
        self._resolve_rank_mapping(info)
        self.prefill_info_table[bootstrap_addr] = info
        ready = True
    else:
        if ready and bootstrap_addr not in refusals:
            problem = _refusal(self, self.prefill_info_table[bootstrap_addr])
            if problem is not None:
                refusals[bootstrap_addr] = problem
    if bootstrap_addr in refusals:
        logger.error("Refusing KV from %s: %s", bootstrap_addr, refusals[bootstrap_addr])
    return ready


def around_receiver_init(original, self, prefill_dp_rank: int):
    result = original(self, prefill_dp_rank)
    problem = getattr(self.kv_mgr, "kvarn_refusals", {}).get(self.bootstrap_addr)
    if problem is not None:
        from sglang.srt.disaggregation.base import KVPoll

        if self.conclude_state != KVPoll.Failed:
            self.kv_mgr.record_failure(self.bootstrap_room, problem)
            self.kv_mgr.update_status(self.bootstrap_room, KVPoll.Failed)
            self.conclude_state = KVPoll.Failed
        self.ensure_abort_notified()  # the prefill server fails its side too
    return result


# ------------------------------------------------------------------ per request
def around_num_pages_to_send(original, self, req, decode_prefix_len: int):
    pool = _kvarn_pool(self.token_to_kv_pool)
    if pool is None:
        return original(self, req, decode_prefix_len)
    cfg = pool.kvarn_config
    mask = packed_page_mask(
        decode_prefix_len, len(req.origin_input_ids), cfg.page_size, cfg.sink_pages
    )
    return sum(mask)


def around_send_kv_chunk(original, self, req, last_chunk: bool = False, end_idx=None):
    pool = _kvarn_pool(self.token_to_kv_pool_allocator.get_kvcache())
    sender = req.disagg_kv_sender
    if pool is None or sender is None:
        return original(self, req, last_chunk, end_idx)
    cfg, g = pool.kvarn_config, pool.kvarn_config.page_size
    start, total = req.disagg_decode_prefix_len, len(req.origin_input_ids)
    positions = fp16_page_positions(start, total, g, cfg.sink_pages)
    fp16 = set(positions)
    component = _slot_component(sender.kv_mgr.kv_args)
    row = self.req_to_token_pool.req_to_token[req.kv.req_pool_idx]
    next_page = req.start_send_idx // g  # page position of the first page of the next send
    send = sender.send

    def send_packed(kv_indices, state_indices=None, *args, **kwargs):
        nonlocal next_page
        event = kwargs.pop("indices_event", None)
        if event is not None:  # a pinned host copy of device page ids: wait until it landed
            event.synchronize()
        kv_indices = np.asarray(kv_indices)
        at = range(next_page, next_page + len(kv_indices))
        next_page += len(kv_indices)
        keep = np.array([j not in fp16 for j in at], dtype=bool)
        if state_indices is not None and component is not None:
            state_indices = list(state_indices)
            slots = request_slots(pool.store, row, positions, g)
            state_indices[component] = np.array(slots, dtype=np.int32)
        return send(kv_indices[keep], state_indices, *args, **kwargs)

    sender.send = send_packed
    try:
        return original(self, req, last_chunk, end_idx)
    finally:
        del sender.send


def around_transfer_page_indices(original, self, decode_req, kv_indices, page_size: int):
    pages = original(self, decode_req, kv_indices, page_size)
    pool = _kvarn_pool(self.token_to_kv_pool)
    if pool is None:
        return pages
    start = decode_req.req.kv.cache_protected_len or 0
    mask = packed_page_mask(start, start + len(kv_indices), page_size, pool.kvarn_config.sink_pages)
    return pages[np.array(mask, dtype=bool)]


def around_send_kv_metadata(
    original, self, decode_req, kv_indices, page_size, state_indices=None, **kwargs
):
    component = _slot_component(self.kv_manager.kv_args)
    if component is not None and state_indices is not None:
        pool = self.token_to_kv_pool
        start = kwargs.get("decode_prefix_len") or 0
        positions = fp16_page_positions(
            start, start + len(kv_indices), page_size, pool.kvarn_config.sink_pages
        )
        row = self.req_to_token_pool.req_to_token[decode_req.req.kv.req_pool_idx]
        state_indices = list(state_indices)
        slots = request_slots(pool.store, row, positions, page_size)
        state_indices[component] = np.array(slots, dtype=np.int32)
    return original(self, decode_req, kv_indices, page_size, state_indices, **kwargs)


# ------------------------------------------------------------------ decode admission
def _slot_demand(allocator, req) -> int:
    """New sink pages a request preallocated from scratch allocates on a decode server."""
    sink = allocator.get_kvcache().kvarn_config.sink_pages
    fill = len(req.origin_input_ids) + max(len(req.output_ids) - 1, 0)
    return len(sink_page_range(0, fill, allocator.page_size, sink)[1])


def around_required_admission_tokens(original, self, req, *args, **kwargs):
    tokens = original(self, req, *args, **kwargs)
    allocator = self.token_to_kv_pool_allocator
    budget = allocator.slot_budget(self.tree_cache) if hasattr(allocator, "slot_budget") else None
    if budget is None or budget.fits([], _slot_demand(allocator, req)):
        return tokens
    allocator.admissions_waited_for_slots += 1
    return _WAIT


def around_resume_retracted_reqs(original, self, *args, **kwargs):
    allocator = self.token_to_kv_pool_allocator
    budget = allocator.slot_budget(self.tree_cache) if hasattr(allocator, "slot_budget") else None
    if budget is None or not self.retracted_queue:
        return original(self, *args, **kwargs)
    queue, fits = self.retracted_queue, 0
    for req in queue:  # resumed in order: stop at the first whose slots are short
        demand = _slot_demand(allocator, req)
        if not budget.fits([], demand):
            break
        budget.admit([], demand)
        fits += 1
    self.retracted_queue = queue[:fits]
    try:
        return original(self, *args, **kwargs)
    finally:
        self.retracted_queue = self.retracted_queue + queue[fits:]


def hooks() -> list[tuple[str, object, str]]:
    """``(target, hook, kind)`` of this module, for ``kvarn_sglang.patches.plugin``."""
    return [
        (BUILD_KV_LAYER_IDS, after_build_kv_layer_ids, "AFTER"),
        (SETUP_STATE_KV_ARGS, after_setup_state_kv_args, "AFTER"),
        (GET_PD_KV_LAYOUT, after_get_pd_kv_layout, "AFTER"),
        (TRY_ENSURE_PARALLEL_INFO, around_try_ensure_parallel_info, "AROUND"),
        (RECEIVER_INIT, around_receiver_init, "AROUND"),
        (NUM_PAGES_TO_SEND, around_num_pages_to_send, "AROUND"),
        (SEND_KV_CHUNK, around_send_kv_chunk, "AROUND"),
        (TRANSFER_PAGE_INDICES, around_transfer_page_indices, "AROUND"),
        (SEND_KV_METADATA, around_send_kv_metadata, "AROUND"),
        (REQUIRED_ADMISSION_TOKENS, around_required_admission_tokens, "AROUND"),
        (RESUME_RETRACTED, around_resume_retracted_reqs, "AROUND"),
    ]
