"""Tensor-parallel ranks make the same KVarN decisions.

With ``--tp-size N`` every rank runs its own scheduler over its own pool, allocator and radix
tree (its share of the KV heads), fed the same requests in the same order, and SGLang relies
on every rank deciding the same: which requests are admitted, which pages and fp16 slots they
get, which cached subtrees are evicted (by SGLang, and by KVarN's eviction by sink), which
requests are retracted. KVarN's decisions read only host lengths, the request rows, the tree
(whose LRU order is a logical clock in SGLang's ``UnifiedRadixCache``, not wall time) and the
slot stack, never K/V values, with one exception: a request whose K/V turn non-finite on one
rank's heads (or too large for its page scales). The plugin's one collective, an all-reduce
(MIN) of the per-request flags over the tensor-parallel CPU group after every pass
(``request_guard.flagged_rows``, called by the scheduler hook on every rank), makes every
rank abort it.

Two ranks here are two ``SchedServer`` (SGLang's own ``PrefillAdder``, ``ScheduleBatch``,
retraction and ``UnifiedRadixCache``) with different K/V (their heads), stepped in lock step:
each runs its pass, then each processes its results through the plugin's scheduler hook, with
a stand-in for ``torch.distributed.all_reduce`` over the two ranks' flags. After every step
both ranks must hold the same batch, the same token slots, the same fp16 slot of every page,
the same free slots and the same counters, with slot-aware admission, sink eviction, mixed
chunks and one request poisoned on rank 1 only. Without the collective the ranks diverge (the
control). (Retraction is data-independent too; the server fuzz's soak exercises it.)
"""

from __future__ import annotations

import dataclasses
import tempfile
from array import array

import pytest
import torch

from benchmarks.harness.pools import ModelShape, make_pool
from benchmarks.harness.sched_context import scheduler_context, write_llama_config
from benchmarks.harness.sglang_sched import SchedServer, check_no_leak
from benchmarks.harness.workloads import Spec

G = 64
SHAPE = ModelShape(layers=1, kv_heads=1, head_dim=64)
POISON_SID = 9


class Rank(SchedServer):
    """One tensor-parallel rank: its own K/V values (its heads); rank 1's heads turn
    non-finite for request ``POISON_SID`` at its third decode step."""

    def __init__(self, rank: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rank = rank
        gen = torch.Generator().manual_seed(100 + rank)
        self.kv_values = torch.randn(*self.kv_values.shape, generator=gen)

    def new_kv(self, batch, pre, seq):
        k, v = super().new_kv(batch, pre, seq)
        if self.rank == 1:
            start = 0
            for req, p, s in zip(batch.reqs, pre, seq, strict=True):
                if req.rid == str(POISON_SID) and s - p == 1 and len(req.output_ids) == 3:
                    k = k.clone()
                    k[start : start + s - p] = float("nan")
                start += s - p
        return k, v


class StandInGroup:
    """The tensor-parallel CPU group of the ranks: ``all_reduce(MIN)`` of a pass's flags is
    the minimum over the ranks' plans (every rank ran its pass before any processes it)."""

    def __init__(self, ranks: list[Rank]) -> None:
        self.ranks, self.calls = ranks, 0

    def all_reduce(self, tensor, op=None, group=None):
        assert group is self and op == torch.distributed.ReduceOp.MIN
        self.calls += 1
        for rank in self.ranks:
            tensor.copy_(torch.minimum(tensor, rank.backend.plan.bad_layer[: len(tensor)].cpu()))


def _spec(sid: int, prompt: list[int], gen: int) -> Spec:
    return Spec(sid, None, array("q", prompt), array("q", [5 + sid] * gen), 0)


def _workload() -> list[Spec]:
    """Shared prefixes (one sink for several requests), distinct prefixes (more sinks than
    slots: admission waits, cached sinks are evicted), long decodes, a long prompt (mixed
    chunks that end inside pages) and the request rank 1 poisons."""
    shared = [3 + i % 40 for i in range(100)]
    specs = [_spec(i, shared + [50 + i] * (5 + 7 * i), 20) for i in range(3)]
    specs += [_spec(3 + i, [60 + i + j % 11 for j in range(70)], 60) for i in range(3)]
    specs.append(_spec(6, [90 + j % 13 for j in range(400)], 4))
    specs += [_spec(7 + i, [120 + i + j % 7 for j in range(150)], 12) for i in range(2)]
    specs.append(_spec(POISON_SID, [200 + j % 9 for j in range(90)], 20))
    return specs


def _state(rank: Rank, batch) -> dict:
    store = rank.kv.store
    return {
        "batch": None if batch is None else [r.rid for r in batch.reqs],
        "token_slots": None if batch is None else batch.out_cache_loc.tolist(),
        "page_slot": store.page_slot.tolist(),
        "free_slots": store.free_slot_ids().tolist(),
        "free_pages": rank.alloc.available_size(),
        "tree_tokens": rank.tree.total_size()[0],
        "sink_evictions": rank.alloc.sink_evictions,
        "waited_for_slots": rank.alloc.admissions_waited_for_slots,
        "evicted": rank.tree.evicted,
        **rank.stats,
    }


def _lockstep(collective: bool) -> tuple[list[Rank], StandInGroup, int, list[str]]:
    """Run both ranks to the end in lock step; the ranks, the group, the steps run and the
    differences found (step and what differed)."""
    from sglang.srt.configs.model_config import ModelConfig

    pool = make_pool("k4v2_g64", SHAPE, int(1e7), 4, kvarn_slots=6, sinkhorn_iters=0)
    pool = dataclasses.replace(pool, token_capacity=12 * G)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_llama_config(tmp, layers=1, kv_heads=1, head_dim=64)
        with scheduler_context(["--page-size", str(G)], model) as args:
            config = ModelConfig.from_server_args(args)
            kw = dict(
                max_running=4,
                max_context=1024,
                chunked_prefill_size=128,
                mixed_chunk=True,
                max_new_tokens=64,
            )
            ranks = [Rank(i, pool, config, **kw) for i in range(2)]
            group = StandInGroup(ranks)
            if collective:
                for rank in ranks:
                    rank.tp_size, rank.tp_cpu_group = 2, group
            for spec in _workload():
                for rank in ranks:
                    rank.submit(dataclasses.replace(spec))
            diffs, steps = [], 0
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch.distributed, "all_reduce", group.all_reduce)
                while True:
                    for r in ranks:
                        r._merge_last_batch()
                    if not any(r.waiting or r.chunked or not r.running.is_empty() for r in ranks):
                        break
                    ran = [r.forward() for r in ranks]
                    assert all(ran), "a waiting request never fits"
                    batches = [r.pending[0] if r.pending else None for r in ranks]
                    for r in ranks:
                        r.process()
                    steps += 1
                    a, b = (_state(r, x) for r, x in zip(ranks, batches, strict=True))
                    diffs += [f"step {steps}: {k}" for k in a if a[k] != b[k]]
                    if diffs:
                        break
            if not diffs:
                for r in ranks:
                    check_no_leak(r)
    return ranks, group, steps, diffs


def test_two_ranks_decide_the_same_with_the_plugins_collective():
    ranks, group, _, diffs = _lockstep(collective=True)
    assert diffs == []
    stats = ranks[0].stats
    assert stats["aborted"] == 1  # the request poisoned on rank 1
    assert ranks[0].alloc.sink_evictions > 0 and ranks[0].alloc.admissions_waited_for_slots > 0
    # The collective ran on both ranks after every pass that planned pages.
    assert group.calls == 2 * (stats["prefill_passes"] + stats["decode_steps"])


def test_without_the_collective_the_ranks_diverge():
    _, _, _, diffs = _lockstep(collective=False)
    assert diffs and "free_pages" in " ".join(diffs)


if __name__ == "__main__":
    test_two_ranks_decide_the_same_with_the_plugins_collective()
