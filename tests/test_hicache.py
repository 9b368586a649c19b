"""SGLang's hierarchical cache over KVarN pages, through the real engine on a CPU:
``sglang.launch_server --kv-cache kvarn --enable-hierarchical-cache --hicache-storage-backend
file``.

The server (``HICACHE_KVARN``) has a device pool of 8 pages (1,024 tokens) and a host tier
of 25 page records (``--hicache-ratio 3``), where a session's sink page takes 5 records and
every other page 1. Six agent sessions of 300 tokens (2 full pages each, distinct first
pages) do not fit on the device (12 pages), nor all in host memory (36 records): host
eviction drops the least recently used ones, which the file backend (L3) still holds. Turn 2
of every session is then a hit (device, host or L3) and must generate what a fresh
computation generates after the caches and L3 are cleared; a server restarted on the same
L3 directory finds the sessions again. ``--max-prefill-tokens 400`` without chunked prefill
keeps every prompt in a prefill batch of its own: on the CPU test bed K/V computed in a batch
of two prompts are not bit-identical to K/V computed alone (measured: the host hit of a
prefix prefilled beside another prompt differed from a lone miss in output logprobs by up to
0.07; prefilled alone, hit and miss agree to every logprob), which would make "equal to a
fresh computation" test the matmul, not the cache.

The tests share the server and run in file order.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from servers import ServerSpec

from benchmarks.harness.agent_sessions import (
    clear_l3_and_flush,
    generate,
    hicache_state,
    make_sessions,
    run_turn,
)
from benchmarks.harness.server_process import SMOLLM2_HF, ServerProcess, http, wait_until_flushed

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("hicache")]

L3_DIR = Path(tempfile.mkdtemp(prefix="kvarn-hicache-l3-"))
HICACHE_KVARN = ServerSpec(
    "smollm2_kvarn_hicache",
    SMOLLM2_HF,
    (
        "--kv-cache", "kvarn", "--page-size", "128", "--max-total-tokens", "1024",
        "--max-running-requests", "2", "--kvarn-slots", "4", "--max-prefill-tokens", "400",
        "--chunked-prefill-size", "-1",
        "--enable-hierarchical-cache", "--hicache-ratio", "3",
        "--hicache-storage-backend", "file",
        "--hicache-storage-backend-extra-config", json.dumps({"file_storage_path": str(L3_DIR)}),
        "--hicache-storage-prefetch-policy", "wait_complete",
        "--sleep-on-idle", "--skip-server-warmup", "--random-seed", "0", "--enable-cache-report",
    ),
)  # fmt: skip
SESSIONS, LENGTH, NEW = 6, 300, 6
TOOL = [504, 5248, 28, 3064, 253, 2694, 30]  # a short "tool result" appended before turn 2
FULL_PAGES = 256  # of a 300-token prompt (+ its answer and the tool tokens)
SINK_OBJECT = 30 * 2 * 128 * 3 * 64 * 2  # a sink page's fp16 K/V in L3 (30 layers, 3 heads)
PACKED_OBJECT = 30 * 3 * 7296  # a packed page's records in L3


@pytest.fixture(scope="module")
def server(server_pool):
    yield server_pool.get(HICACHE_KVARN)
    shutil.rmtree(L3_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def fresh() -> dict:
    """Turn-2 prompts and the outputs of their fresh computation, filled by the first test."""
    return {}


def _wait_for_l3_writes(url: str, at_least: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while (state := hicache_state(url))["l3_bytes_written"] < at_least:
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    return state


def test_sessions_beyond_the_device_come_back_from_host_and_l3_equal_to_a_fresh_computation(
    server, fresh
):
    url = server.url
    clear_l3_and_flush(url)
    sessions = make_sessions(SESSIONS, LENGTH)
    before = hicache_state(url)
    assert before["host_pages_total"] == 25 and before["host_records_per_sink_page"] == 5
    with ThreadPoolExecutor(SESSIONS) as pool:  # every session's first turn at once
        first = list(pool.map(lambda s: run_turn(url, s, NEW), sessions))
    assert [cached for cached, _, _ in first] == [0] * SESSIONS
    after_turn1 = hicache_state(url)
    assert after_turn1["host_pages_freed"] > before["host_pages_freed"]  # host eviction
    assert after_turn1["backups_skipped_host_full"] == before["backups_skipped_host_full"]
    # Every backed-up page went on to L3: 6 sink pages and 6 packed pages.
    _wait_for_l3_writes(url, before["l3_bytes_written"] + SESSIONS * (SINK_OBJECT + PACKED_OBJECT))

    hits = [run_turn(url, s, NEW, TOOL) for s in sessions]  # one at a time, oldest first
    assert [cached for cached, _, _ in hits] == [FULL_PAGES] * SESSIONS
    after_turn2 = hicache_state(url)
    loaded = after_turn2["bytes_to_device"] - after_turn1["bytes_to_device"]
    assert loaded >= 4 * (SINK_OBJECT + PACKED_OBJECT)  # at most 2 sessions stayed on device
    assert after_turn2["l3_bytes_read"] > after_turn1["l3_bytes_read"]  # evicted from host

    clear_l3_and_flush(url)
    flushed = hicache_state(url)
    assert flushed["host_pages_free"] == flushed["host_pages_total"]
    assert flushed["host_sink_pages"] == 0
    prompts = [s.history[: s.turns[1][0]] for s in sessions]
    misses = [generate(url, ids, NEW) for ids in prompts]
    assert [m["meta_info"]["cached_tokens"] for m in misses] == [0] * SESSIONS
    assert [m["output_ids"] for m in misses] == [out for _, out, _ in hits]
    fresh.update(prompts=prompts, outputs=[m["output_ids"] for m in misses])
    assert server.alive(), server.log_tail()


def test_abort_while_a_session_is_being_loaded_loses_nothing(server, fresh):
    """Abort turn-2 requests while they run: sent again and again from the moment they are
    submitted, the abort lands while their pages are fetched from L3 (the request waits for
    its prefetch), loaded from host, or while they decode; then the same turns complete,
    equal to the fresh ones."""
    url, prompts = server.url, fresh["prompts"]
    for i in (0, 1):
        outcome: dict = {}

        def send(i=i, outcome=outcome):
            try:
                outcome["answer"] = generate(url, prompts[i], 64, rid=f"abort-{i}")
            except Exception as err:  # an aborted request may answer with an HTTP error
                outcome["answer"] = err

        thread = threading.Thread(target=send)
        thread.start()
        while thread.is_alive():
            http(f"{url}/abort_request", {"rid": f"abort-{i}"})
            thread.join(timeout=0.05)
        answer = outcome["answer"]
        if not isinstance(answer, Exception):  # else the abort answered with an HTTP error
            assert answer["meta_info"]["finish_reason"]["type"] == "abort", answer["meta_info"]
    again = [generate(url, prompts[i], NEW) for i in (0, 1)]
    assert [a["output_ids"] for a in again] == fresh["outputs"][:2]
    assert server.alive(), server.log_tail()


def test_a_restarted_server_finds_the_sessions_in_the_file_backend(server, server_pool, fresh):
    """The L3 objects carry the preset in their keys; a server restarted with the same flags
    on the same directory prefetches them, and its turns equal the fresh computation."""
    url = server.url
    written = SESSIONS * (SINK_OBJECT + PACKED_OBJECT)
    _wait_for_l3_writes(url, written)
    names = [p.name for p in L3_DIR.iterdir() if p.suffix == ".bin"]
    assert len(names) >= 2 * SESSIONS
    assert all("kvarn_k4v2_g128_sink1_bfloat16" in n for n in names)
    restarted = ServerProcess(
        SMOLLM2_HF, list(HICACHE_KVARN.args), server_pool.directory / "hicache_restart.log"
    )
    with restarted:
        answers = [generate(restarted.url, fresh["prompts"][i], NEW) for i in (2, 3, 4)]
        state = hicache_state(restarted.url)
        assert [a["meta_info"]["cached_tokens"] for a in answers] == [FULL_PAGES] * 3
        assert [a["output_ids"] for a in answers] == fresh["outputs"][2:5]
        assert state["l3_bytes_read"] >= 3 * (SINK_OBJECT + PACKED_OBJECT)
        assert "memory leak detected" not in restarted.log_text()


def test_idle_server_has_every_page_slot_and_host_record_back(server):
    """SGLang's idle memory check (strict: a leak raises in the scheduler) ran the pool's
    check, which covers the host records (``KVarNHostPool.verify``); a flush returns every
    device page, fp16 slot and host record."""
    wait_until_flushed(server.url)
    state = server.internal_state()["kvarn"]
    assert state["idle_checks"] > 0
    assert state["pages_free"] == state["pages_total"], state
    assert state["slots_free"] == state["slots_total"], state
    host = state["hicache"]
    assert host["host_pages_free"] == host["host_pages_total"], host
    assert "memory leak detected" not in server.log_text()
    assert server.alive(), server.log_tail()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
