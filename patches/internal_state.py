"""Hook on ``sglang.srt.managers.scheduler_components.internal_state.
SchedulerInternalStateController._add_memory_usage`` (sglang==0.5.23): with ``--kv-cache
kvarn`` the scheduler's internal state (``/get_server_info`` → ``internal_states``) gains a
``kvarn`` entry: the preset, the fp16 slots (total, free), the pages (total, free) and the
bytes of the pool, so a client can see the KVarN pool and check that nothing leaked."""

from __future__ import annotations

ADD_MEMORY_USAGE = (
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController._add_memory_usage"
)


def after_add_memory_usage(result, self, state):
    allocator = self.scheduler.token_to_kv_pool_allocator
    describe = getattr(allocator, "kvarn_state", None)
    if describe is not None:
        state["kvarn"] = describe()
    return result
