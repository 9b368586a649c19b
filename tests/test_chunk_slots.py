"""A chunked prefill whose chunk ends inside a page needs two filling pages at once.

SGLang cuts the first chunk of a request at a page boundary but a continued chunk anywhere:
``--enable-mixed-chunk`` lowers the chunk budget by the running requests' decode tokens (a
short memory budget lowers it too). The next chunk then starts inside the page the last one
left partial (it holds a slot, released only after the pass that completes it) and, if it ends
inside a later page, opens that page's slot first: two filling pages for one request
(``pages.filling_slots``). Admission used to count one, so at a full slot budget the allocation
failed and SGLang raised its fatal "Prefill out of memory". These tests drive SGLang's own
``PrefillAdder``, ``ScheduleBatch`` and ``mix_with_running`` (``benchmarks.harness.sglang_sched``)
into exactly that pass.
"""

from __future__ import annotations

import tempfile
from array import array

import pytest

from benchmarks.harness.pools import ModelShape, make_pool
from benchmarks.harness.sched_context import scheduler_context, write_llama_config
from benchmarks.harness.sglang_sched import SchedServer, check_no_leak
from benchmarks.harness.workloads import Spec
from kvarn_sglang.serving.pages import filling_slots
from kvarn_sglang.serving.slot_budget import SlotBudget

G = 64
SHAPE = ModelShape(layers=1, kv_heads=1, head_dim=64)


def test_filling_slots_is_two_only_for_a_pass_from_inside_a_page_into_a_later_one():
    assert filling_slots(228, 264, 64, 1) == 2  # page 3 completes from its slot, page 4 opens
    assert filling_slots(228, 256, 64, 1) == 1  # ends on the boundary: nothing opens
    assert filling_slots(228, 330, 64, 1) == 2  # page 4 is filled directly, page 5 opens
    assert filling_slots(255, 256, 64, 1) == 1  # a decode step completes a page
    assert filling_slots(256, 257, 64, 1) == 1  # ... and the next one opens one
    assert filling_slots(0, 300, 64, 1) == 1  # a first chunk: the sink page is not filling
    assert filling_slots(100, 300, 64, 2) == 1  # it starts inside a sink page
    assert filling_slots(30, 100, 64, 0) == 2  # no sink pages: page 0 is a filling page
    for sink in (0, 1, 2):
        for p in range(0, 5 * 8):
            for s in range(p + 1, 5 * 8 + 1):
                n = filling_slots(p, s, 8, sink)
                two = p % 8 != 0 and p // 8 >= sink and s > (p // 8 + 1) * 8 and s % 8 != 0
                assert n == (2 if two else min(1, n)) and n <= 2, (p, s, sink, n)
                if s == p + 1:
                    assert n <= 1, (p, s, sink)


def test_budget_reserves_the_second_filling_page_of_a_chunked_request():
    budget = SlotBudget(num_slots=5, live_sinks={3}, live_requests=1, chunked=1)
    assert budget.committed == 3  # the sink, the chunked request's two filling pages
    assert budget.demand([], 1) == 2 and budget.demand([], 1, chunked=True) == 3
    assert budget.fits([], 1) and not budget.fits([], 1, chunked=True)
    budget.admit([3], 0, chunked=False)
    assert budget.committed == 4 and budget.fits([3], 0) and not budget.fits([3], 0, True)


def _spec(sid: int, prompt: int, gen: int, base: int) -> Spec:
    tokens = array("q", [base + i % 50 for i in range(prompt)])
    return Spec(sid, None, tokens, array("q", [7] * gen), 0)


def _mixed_chunk_run(slots: int) -> tuple[SchedServer, int]:
    """One request decoding (70-token prompt: its sink page and a filling page), then a
    500-token prompt prefilled in 128-token chunks with ``--enable-mixed-chunk``: its chunks
    end at 64, 191 (inside page 2) and 318 (inside page 4), and the third one holds pages 2
    and 4 at once. Returns the server and the most slots held right after an allocation."""
    from sglang.srt.configs.model_config import ModelConfig

    pool = make_pool("k4v2_g64", SHAPE, int(1e7), 2, kvarn_slots=slots, sinkhorn_iters=0)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_llama_config(tmp, layers=1, kv_heads=1, head_dim=64)
        with scheduler_context(["--page-size", str(G)], model) as args:
            server = SchedServer(
                pool, ModelConfig.from_server_args(args), max_running=2, max_context=1024,
                chunked_prefill_size=128, mixed_chunk=True,
            )  # fmt: skip
            store, alloc_extend, peak = server.kv.store, server.alloc.alloc_extend, [0]

            def recording(*args, **kwargs):
                out = alloc_extend(*args, **kwargs)
                peak[0] = max(peak[0], store.num_slots - store._top)
                return out

            server.alloc.alloc_extend = recording
            server.submit(_spec(1, 70, 40, 100))
            for _ in range(3):
                server.step()
            server.submit(_spec(2, 500, 4, 200))
            server.run([])  # SGLang's "Prefill out of memory" if a chunk finds no slot
            check_no_leak(server)
    return server, peak[0]


@pytest.mark.parametrize("slots", [4, 5])
def test_a_chunk_that_starts_inside_a_page_finds_its_second_slot(slots):
    server, peak = _mixed_chunk_run(slots)
    assert server.stats["requests"] == 2 and server.stats["retractions"] == 0
    assert server.stats["pages_quantized"] == server.stats["pages_completed"] > 0
    if slots == 4:  # 2 held by the decoding request + a sink and 2 filling pages: it waits
        assert server.alloc.admissions_waited_for_slots >= 1
    else:  # it runs beside the decoding request, its third chunk on every slot
        assert server.alloc.admissions_waited_for_slots == 0 and peak == 5


if __name__ == "__main__":
    test_a_chunk_that_starts_inside_a_page_finds_its_second_slot(slots=4)
