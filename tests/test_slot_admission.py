"""Slot-aware admission through SGLang's real ``PrefillAdder`` (hooked by the plugin) and
its real allocation path (``ScheduleBatch.prepare_for_extend``), with both radix trees.

SGLang alone admits a request when its pages fit. With KVarN it must also have its fp16
slots: a sink page no live request holds, and the page it fills (a running request that
holds no filling page now reserves the one it will open). The tests show SGLang alone
over-committing (the allocation then fails: SGLang's fatal "Prefill out of memory", or a
decode retraction), and the hook keeping the request waiting instead.
"""

from __future__ import annotations

from array import array

import pytest
from sglang_harness import SimServer

from benchmarks.harness.sched_context import scheduler_context
from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.serving.pages import sink_page_range
from kvarn_sglang.serving.slot_budget import SlotBudget

G = 64
CFG = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=1)
FLAGS = ["--kv-cache", "kvarn", "--page-size", "64", "--kvarn-preset", "k4v2_g64",
         "--max-running-requests", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def sched():
    """SGLang's scheduler configuration, published as in a scheduler process."""
    from sglang.srt.configs.model_config import ModelConfig

    with scheduler_context(FLAGS) as args:
        yield ModelConfig.from_server_args(args)


def _req(rid: str, tokens: list[int], max_new: int = 16):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    params.normalize(None)
    params.verify(1000)
    return Req(rid=rid, origin_input_text="", origin_input_ids=array("q", tokens),
               sampling_params=params)  # fmt: skip


def _adder(server: SimServer):
    from sglang.srt.managers.schedule_policy import PrefillAdder

    return PrefillAdder(G, server.tree, server.alloc, None, 0.7, 16384, None)


def _add(adder, server: SimServer, req, *, hooked: bool = True):
    from sglang.srt.managers.schedule_policy import PrefillAdder

    req.init_next_round_input(server.tree)
    add = PrefillAdder.add_one_req
    add = add if hooked else add.__wrapped__  # SGLang's own method, without the plugin
    return add(adder, req, has_chunked_req=False, truncation_align_size=None).name


def _prefill(server: SimServer, sched, reqs) -> None:
    """Allocate ``reqs`` the way the scheduler does (``ScheduleBatch.prepare_for_extend``)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    batch = ScheduleBatch.init_new(reqs, server.req_pool, server.alloc, server.tree, sched,
                                   False, SpeculativeAlgorithm.NONE)  # fmt: skip
    batch.prepare_for_extend()


def _cached_and_running(tree: str) -> tuple[SimServer, list[int]]:
    """Four slots: a cached prefix (its sink holds one) and a running request with a private
    sink and a filling page (two): one slot free, one more behind the cached sink."""
    server = SimServer(CFG, num_pages=40, num_slots=4, tree=tree)
    cached = [7] * (2 * G)
    server.finish(_start(server, cached))
    _start(server, [8] * (G + 5))
    assert server.pool.store.free_slots == 1
    return server, cached


def _start(server: SimServer, tokens: list[int]):
    req = server.start(tokens)
    assert server.extend([req], [len(tokens) - req.cached_len])
    return req


def test_sink_page_range_and_budget_arithmetic():
    assert [list(r) for r in sink_page_range(0, 300, 128, 1)] == [[], [0]]
    assert [list(r) for r in sink_page_range(256, 300, 128, 2)] == [[0, 1], []]
    assert [list(r) for r in sink_page_range(128, 300, 128, 2)] == [[0], [1]]
    assert [list(r) for r in sink_page_range(0, 100, 128, 2)] == [[], [0]]
    budget = SlotBudget(num_slots=5, live_sinks={3}, live_requests=1)
    assert budget.demand([3], 0) == 1 and budget.demand([4], 0) == 2 and budget.demand([], 1) == 2
    assert budget.fits([], 1) and budget.committed == 2
    budget.admit([], 1)
    assert not budget.fits([4], 0) and budget.fits([3], 0)
    with pytest.raises(ValueError, match="Invalid lengths"):
        sink_page_range(10, 5, 128, 1)


@pytest.mark.parametrize("tree", ["radix", "unified"])
def test_admission_refuses_to_over_commit_slots(sched, tree):
    server, cached = _cached_and_running(tree)
    adder = _adder(server)
    first, second = _req("c", [5] * (G + 3)), _req("d", [6] * (G + 3))
    assert _add(adder, server, first) == "CONTINUE"  # its sink + filling page: 2 of 2
    assert _add(adder, server, second) == "NO_TOKEN"  # it waits: no slot would be left
    assert _add(adder, server, _req("e", cached + [1] * 9)) == "NO_TOKEN"  # same for a hit
    assert adder.can_run_list == [first] and server.alloc.admissions_waited_for_slots == 2
    _prefill(server, sched, [first])  # the cached prefix is evicted by sink for it
    assert server.alloc.sink_evictions == 1 and server.pool.store.free_slots == 0

    server, _ = _cached_and_running(tree)  # SGLang alone admits both, then cannot allocate
    adder = _adder(server)
    both = [_req("c", [5] * (G + 3)), _req("d", [6] * (G + 3))]
    assert [_add(adder, server, r, hooked=False) for r in both] == ["CONTINUE", "CONTINUE"]
    with pytest.raises(RuntimeError, match="Prefill out of memory"):
        _prefill(server, sched, both)


def test_admission_reserves_the_page_a_running_request_will_open(sched):
    server = SimServer(CFG, num_pages=40, num_slots=3, tree="unified")
    running = _start(server, [8] * (2 * G))  # holds its sink; its next token opens a page
    assert server.pool.store.free_slots == 2
    assert _add(_adder(server), server, _req("c", [5] * (G + 3))) == "NO_TOKEN"
    running.tokens.append(9)
    assert server.decode([running])  # the reserved slot is there

    server = SimServer(CFG, num_pages=40, num_slots=3, tree="unified")
    _start(server, [8] * (2 * G))
    late = _req("c", [5] * (G + 3))
    assert _add(_adder(server), server, late, hooked=False) == "CONTINUE"  # SGLang alone
    _prefill(server, sched, [late])
    # The running request's next page has no slot: SGLang would have to retract.
    assert not server.alloc.check_decode_capacity(num_tokens=G, tree_cache=server.tree)


def test_requests_sharing_a_cached_sink_need_only_their_filling_page(sched):
    server = SimServer(CFG, num_pages=40, num_slots=4, tree="unified")
    prompt = [7] * (2 * G)
    server.finish(_start(server, prompt))
    _start(server, prompt + [1] * 5)  # running on the cached prefix: its sink is live
    assert server.pool.store.free_slots == 2
    adder = _adder(server)
    branches = [_req(f"b{i}", prompt + [2 + i] * 5) for i in range(3)]
    assert [_add(adder, server, r) for r in branches] == ["CONTINUE", "CONTINUE", "NO_TOKEN"]
    _prefill(server, sched, adder.can_run_list)
    assert server.pool.store.free_slots == 0 and server.alloc.sink_evictions == 0
    held = server.pool.store.held_mask()
    assert int(held.sum()) == 4  # one shared sink + three filling pages


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q", "-k", "over_commit"]))
