"""A chunk that ends inside a page, through the real engine: stock ``sglang.launch_server
--kv-cache kvarn --enable-mixed-chunk`` on a CPU.

With mixed chunks SGLang lowers a continued chunk's budget by the running requests' decode
tokens, so chunks end inside pages, and the chunk after such a one needs two filling pages at
once (``tests/test_chunk_slots.py`` has the arithmetic and the scheduler-level test). Here one
request decodes (its sink page and a filling page) while a 500-token prompt is prefilled in
127-token chunks on 4 slots: before slot admission reserved the second filling page, its third
chunk found no slot and the scheduler died with "Prefill out of memory". Now the prompt waits
for the slots, both requests complete and every page and slot comes back.
"""

from __future__ import annotations

import http.client
import json
import random
import sys
import threading

import pytest
from servers import ServerSpec

from benchmarks.harness.server_process import ServerProcess, wait_until_flushed

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("robust")]

# The fuzzer's tiny checkpoint, 2 running requests on 4 slots (the minimum is 3), mixed chunks.
MIXED_CHUNK_KVARN = ServerSpec(
    "mixed_chunk_kvarn",
    "fuzz_model",
    (
        "--kv-cache", "kvarn", "--page-size", "64", "--kvarn-preset", "k4v2_g64",
        "--max-running-requests", "2", "--kvarn-slots", "4", "--max-total-tokens", "4096",
        "--chunked-prefill-size", "128", "--enable-mixed-chunk", "--context-length", "1024",
        "--sleep-on-idle", "--skip-server-warmup", "--random-seed", "0",
    ),
)  # fmt: skip


@pytest.fixture(scope="module")
def server(server_pool):
    return server_pool.get(MIXED_CHUNK_KVARN, fresh=True)


def _stream_until_first_token(server: ServerProcess, ids: list[int], max_new: int):
    """Start a streamed generation and return its open response once it decodes."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True}}  # fmt: skip
    conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
    answer = conn.getresponse()
    assert answer.status == 200
    while not answer.readline().startswith(b"data:"):
        pass
    return conn, answer


def test_a_chunk_that_starts_inside_a_page_waits_for_its_slots(server):
    rng = random.Random(0)
    prompt = [rng.randrange(3, 250) for _ in range(70)]
    conn, decoding = _stream_until_first_token(server, prompt, 80)
    result: dict[str, object] = {}

    def prefill() -> None:
        ids = [rng.randrange(3, 250) for _ in range(500)]
        try:
            result["answer"] = server.generate(
                {"input_ids": ids, "sampling_params": {"max_new_tokens": 4}}, timeout=300
            )
        except Exception as err:  # reported below
            result["answer"] = err

    thread = threading.Thread(target=prefill)
    thread.start()
    streamed = decoding.read().decode()
    conn.close()
    thread.join()
    assert server.alive(), server.log_tail()
    last = [line for line in streamed.splitlines() if line.startswith("data: {")][-1]
    assert json.loads(last[6:])["meta_info"]["finish_reason"]["type"] == "length"
    answer = result["answer"]
    assert isinstance(answer, dict) and len(answer["output_ids"]) == 4, answer
    wait_until_flushed(server.url)
    state = server.internal_state()["kvarn"]
    assert state["slots_free"] == state["slots_total"] == 4
    assert state["pages_free"] == state["pages_total"]
    assert state["admissions_waited_for_slots"] >= 1
    assert "Prefill out of memory" not in server.log_text()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
