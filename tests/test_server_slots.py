"""Slots short through the real engine: stock ``sglang.launch_server --kv-cache kvarn`` on a
CPU, with fewer fp16 slots than distinct prefixes.

The run's shared KVarN server (``servers.SMOLLM2_KVARN``, SmolLM2-135M) runs 4 requests at
most with 5 slots, the minimum (4 filling pages + 1 sink): requests with distinct prefixes (a
private sink and a filling page each) cannot all run at once, and the sinks of finished
prefixes fill the pool. Pages are
plentiful, so every shortage here is a slot shortage. Rounds of concurrent requests over 10
distinct 200-token prefixes (more than the slots), revisiting some (prefix-cache hits) and
adding new ones, must all complete: slot-aware admission keeps requests waiting instead of
SGLang's fatal "Prefill out of memory", eviction by sink frees cached sinks, and with the
server idle every page and slot is back.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from servers import SMOLLM2_KVARN

from benchmarks.harness.server_process import ServerProcess, wait_until_flushed

pytestmark = pytest.mark.server

PREFIXES = 10


@pytest.fixture(scope="module")
def server(server_pool):
    return server_pool.get(SMOLLM2_KVARN, fresh=True)


def _prompts() -> list[list[int]]:
    """10 distinct prefixes of 200 tokens: a sink page and a partial page."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(100, 40000, (PREFIXES, 200), generator=gen).tolist()


def _run_round(server: ServerProcess, prompts: list[list[int]]) -> dict[int, object]:
    """Send every prompt at once (one thread each); the answer or the error, per prompt."""
    outcomes: dict[int, object] = {}

    def one(i: int, ids: list[int]) -> None:
        try:
            outcomes[i] = server.generate(
                {"input_ids": ids, "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
            )
        except Exception as err:  # reported by the caller's assertion
            outcomes[i] = err

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_more_distinct_prefixes_than_slots_all_complete_and_return_every_slot(server):
    before = server.internal_state()["kvarn"]  # the server is shared: compare counters
    prompts = _prompts()
    rounds = [
        prompts[:6],  # six distinct prefixes at once: at most two fit (two slots each)
        prompts[4:10] + [[*p, 7, 8, 9] for p in prompts[:2]],  # new ones and two hits
        [[*p, 11] for p in prompts[::3]],  # old prefixes again: evicted or cached
    ]
    answers = []
    for prompts_of_round in rounds:
        outcomes = _run_round(server, prompts_of_round)
        failed = {i: o for i, o in outcomes.items() if isinstance(o, Exception)}
        assert not failed, failed
        assert server.alive(), server.log_tail()
        answers += list(outcomes.values())
    assert len(answers) == 18
    assert all(len(a["output_ids"]) == 6 for a in answers)
    state = server.internal_state()["kvarn"]
    assert state["slots_total"] == 5
    waited = state["admissions_waited_for_slots"] - before["admissions_waited_for_slots"]
    assert waited > 0  # slots were short: requests waited
    assert state["sink_evictions"] > before["sink_evictions"]  # cached sinks evicted by sink
    assert any(a["meta_info"]["cached_tokens"] >= 128 for a in answers)  # and some hit
    log = server.log_text()
    assert "Prefill out of memory" not in log and "Retract requests" not in log
    wait_until_flushed(server.url)
    state = server.internal_state()["kvarn"]
    assert state["slots_free"] == state["slots_total"], state
    assert state["pages_free"] == state["pages_total"], state
    assert state["idle_checks"] > before["idle_checks"]
    assert "memory leak detected" not in server.log_text()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
