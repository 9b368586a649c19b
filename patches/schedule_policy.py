"""Hook on ``sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req`` (sglang==0.5.23):
slot-aware admission.

SGLang's ``PrefillAdder`` admits a waiting request when its pages fit; it does not know that
KVarN also needs fp16 page slots (a sink page not already held, and the page the request is
filling). With ``--kv-cache kvarn`` the paired allocator (``KVarNPagedAllocator``) answers what
the requests holding KV have committed (``slot_budget``, once per scheduling pass) and what a
candidate adds (``request_sinks``); this hook admits the candidate only if both fit in the
pool's slots (``kvarn_sglang.serving.slot_budget``), and otherwise answers ``NO_TOKEN``,
SGLang's own "not enough memory, wait" verdict: the request stays queued and admission stops for
this pass, as when pages are short. Decode reserves its slots through the same sum (one filling
page per request), and ``check_decode_capacity`` frees cached sinks when it must. With any other
allocator the hook calls SGLang's method unchanged.
"""

from __future__ import annotations

ADD_ONE_REQ = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"
_UNSET = object()


def slot_budget_of(adder):
    """The ``SlotBudget`` of a ``PrefillAdder``'s pass (None without KVarN), made once."""
    budget = adder.__dict__.get("_kvarn_slot_budget", _UNSET)
    if budget is _UNSET:
        make = getattr(adder.token_to_kv_pool_allocator, "slot_budget", None)
        budget = None if make is None else make(adder.tree_cache)
        adder._kvarn_slot_budget = budget
    return budget


def around_add_one_req(original, self, req, *args, **kwargs):
    budget = slot_budget_of(self)
    if budget is None:
        return original(self, req, *args, **kwargs)
    from sglang.srt.managers.schedule_policy import AddReqResult

    allocator = self.token_to_kv_pool_allocator
    cached, new = allocator.request_sinks(self.tree_cache, req)
    if not budget.fits(cached, new):
        allocator.admissions_waited_for_slots += 1
        return AddReqResult.NO_TOKEN
    admitted = len(self.can_run_list)
    result = original(self, req, *args, **kwargs)
    if len(self.can_run_list) > admitted and self.can_run_list[-1] is req:
        budget.admit(cached, new)
    return result
