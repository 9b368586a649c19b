"""Hooks on ``sglang.srt.managers.schedule_policy.PrefillAdder`` (sglang==0.5.23): slot-aware
admission.

SGLang's ``PrefillAdder`` admits a waiting request when its pages fit; it does not know that
KVarN also needs fp16 page slots (a sink page not already held, the page the request is
filling, and while it is prefilled in chunks a second filling page: ``pages.filling_slots``).
With ``--kv-cache kvarn`` the paired allocator (``KVarNPagedAllocator``) answers what the
requests holding KV have committed (``slot_budget``, once per scheduling pass) and what a
candidate adds (``request_sinks``):

* ``add_chunked_req`` (AROUND): the request SGLang is prefilling in chunks holds KV; its
  commitment includes the second filling page for as long as it is chunked;
* ``add_one_req`` (AROUND): a candidate is admitted only if its slots fit in the pool's
  (``kvarn_sglang.serving.slot_budget``), counting the second filling page when SGLang would
  cut it into chunks (its page-rounded extend exceeds the pass's chunk budget, SGLang's own
  rule); otherwise the hook answers ``NO_TOKEN``, SGLang's own "not enough memory, wait"
  verdict: the request stays queued and admission stops for this pass, as when pages are
  short.

Decode reserves its slots through the same sum (one filling page per request), and
``check_decode_capacity`` frees cached sinks when it must. With any other allocator the hooks
call SGLang's methods unchanged.
"""

from __future__ import annotations

ADD_ONE_REQ = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"
ADD_CHUNKED_REQ = "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req"
_UNSET = object()


def slot_budget_of(adder):
    """The ``SlotBudget`` of a ``PrefillAdder``'s pass (None without KVarN), made once."""
    budget = adder.__dict__.get("_kvarn_slot_budget", _UNSET)
    if budget is _UNSET:
        make = getattr(adder.token_to_kv_pool_allocator, "slot_budget", None)
        budget = None if make is None else make(adder.tree_cache)
        if budget is not None:
            budget.chunked += adder.__dict__.get("_kvarn_chunked", 0)
        adder._kvarn_slot_budget = budget
    return budget


def around_add_chunked_req(original, self, req, *args, **kwargs):
    """The request being prefilled in chunks is live: count its second filling page."""
    self._kvarn_chunked = self.__dict__.get("_kvarn_chunked", 0) + 1
    budget = self.__dict__.get("_kvarn_slot_budget")
    if budget is not None:  # made before this call: count it there too
        budget.chunked += 1
    return original(self, req, *args, **kwargs)


def would_chunk(adder, req) -> bool:
    """Whether ``add_one_req`` would cut ``req`` into chunks: its page-rounded extend exceeds
    the pass's chunk budget (``PrefillAdder._select_prefill_admission``)."""
    rem, g = adder.rem_chunk_tokens, adder.page_size
    extend = len(req.full_untruncated_fill_ids) - req.prefix_len
    return rem is not None and -(-extend // g) * g > rem


def around_add_one_req(original, self, req, *args, **kwargs):
    budget = slot_budget_of(self)
    if budget is None:
        return original(self, req, *args, **kwargs)
    from sglang.srt.managers.schedule_policy import AddReqResult

    allocator = self.token_to_kv_pool_allocator
    cached, new = allocator.request_sinks(self.tree_cache, req)
    if not budget.fits(cached, new, chunked=would_chunk(self, req)):
        allocator.admissions_waited_for_slots += 1
        return AddReqResult.NO_TOKEN
    admitted = len(self.can_run_list)
    result = original(self, req, *args, **kwargs)
    if len(self.can_run_list) > admitted and self.can_run_list[-1] is req:
        budget.admit(cached, new, chunked=self.new_chunked_req is req)
    return result
