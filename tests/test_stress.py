"""The randomized pool + allocator + radix cache stress (``tests/stress.py``): a short seeded run
keeps every invariant and exercises every path; planted bugs are caught and shrunk to a few
operations. Long runs: ``python -m benchmarks.bench_stress``."""

from __future__ import annotations

import types
from dataclasses import replace

import pytest
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
from stress import CFG, StressDriver, StressFailure, format_ops, replay, run_stress

# Every path the harness is meant to stress must be taken by the CI runs (seed 0).
EXERCISED = [
    "admitted",
    "prefix_hit_tokens",
    "aborted_in_waiting",
    "aborted_in_prefill",
    "aborted_in_decode",
    "finished_total",
    "matched_tokens",
    "evict",
    "outputs_compared",
    "dense_checks",
]
# name: (driver settings, paths that regime must take)
REGIMES = {
    "pages_run_out": (dict(num_pages=10), ["prefill_waits_for_pages", "retracted"]),
    "slots_run_out": (dict(num_pages=24), ["slot_evicted_tokens"]),
    "slots_short_without_slot_admission": (
        dict(num_pages=16, num_slots=6),
        ["prefill_waits_for_slots", "decode_short_of_slots", "retracted"],
    ),
}


@pytest.mark.parametrize("settings, paths", list(REGIMES.values()), ids=list(REGIMES))
def test_seeded_stress_run_keeps_every_invariant_and_exercises_every_path(settings, paths):
    """Page-bound, slot-bound ((sink + 1) slots per running request, plus one) and a slot
    pool below that, which this harness (it admits by pages only) runs short of: nothing
    crashes or leaks, requests wait or are retracted."""
    stats = run_stress(seed=0, steps=1000, **settings)
    assert stats["invariant_checks"] == 1000
    missing = [key for key in EXERCISED + paths if stats.get(key, 0) == 0]
    assert not missing, f"paths never taken: {missing} ({stats})"


def test_stress_is_reproducible():
    assert run_stress(seed=5, steps=150) == run_stress(seed=5, steps=150)


class LeakOnAbort(StressDriver):
    """Planted bug: an aborted request's pages are never freed."""

    def _drop(self, r):
        if r.sim is not None:
            self.server.tree.dec_lock_ref(r.sim.node)
            self.server.req_pool.free_rows([r.sim.row])
        del self.reqs[r.rid]


class SlotsOutliveFreedPages(StressDriver):
    """Planted bug: the allocator frees pages without releasing their fp16 slots (SGLang's own
    paged allocator, i.e. KVarN's hook missing)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        alloc = self.server.alloc
        alloc._release_page_ids = types.MethodType(
            PagedTokenToKVPoolAllocator._release_page_ids, alloc
        )


class SlotCommitsDiffer(StressDriver):
    """Planted bug: pages committed from their fp16 slot (filled over several passes) are
    quantized without variance normalization, pages filled in one pass with it, so a prefix
    computed in chunks reads differently from the same prefix computed at once."""

    def __init__(self, **kw):
        super().__init__(**kw)
        store = self.server.pool.store
        commit = store.commit

        def commit_slots(layer, page_ids, **kwargs):
            slots = store.page_slot[page_ids]
            k, v = store.slot_k[layer][slots], store.slot_v[layer][slots]
            store.config = replace(CFG, sinkhorn_iters=0)
            try:
                commit(layer, page_ids, k, v, **kwargs)
            finally:
                store.config = CFG

        store.commit_slots = commit_slots


@pytest.mark.parametrize(
    "bug, message",
    [(LeakOnAbort, "leaked"), (SlotsOutliveFreedPages, "slot"), (SlotCommitsDiffer, "differs")],
    ids=["page_leak", "slot_leak", "hit_differs_from_miss"],
)
def test_planted_bug_is_caught_and_shrunk_to_a_replayable_minimal_sequence(bug, message):
    with pytest.raises(StressFailure, match=message) as failure:
        run_stress(seed=0, steps=400, driver_cls=bug, shrink_budget_s=60)
    ops = failure.value.ops
    assert 2 <= len(ops) <= 6, format_ops(ops)
    assert ops[0][0] == "new"
    assert format_ops(ops) in str(failure.value)
    with pytest.raises(AssertionError, match=message):
        replay(ops, bug)
    replay(ops)  # the same sequence passes without the bug


if __name__ == "__main__":
    print(run_stress(seed=0, steps=1000))
