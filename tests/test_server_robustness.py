"""No request takes a KVarN server down: the real CPU server against bad requests (~2 min).

The run's shared fuzz server (``servers.FUZZ_KVARN``: stock ``python -m sglang.launch_server
--kv-cache kvarn``) serves the tiny checkpoint of ``benchmarks.harness.fuzz_model``, in which
one token (id 250, byte 0x9C: any text with "Ŝ" has it) makes layer 0's K non-finite, with the
fuzzer's small pool (``FUZZ_ARGS``). The tests:

* requests whose K/V turn non-finite, in the prompt (after a cached prefix, in a middle chunk
  of a chunked prefill) and in a decode step, plain and streamed, fail with the KVarN error
  and a log line naming them and the layer, while clean requests sent with them complete with
  the outputs they have alone, and the cached prefix still serves the same output;
* a short seed of the server fuzzer (``benchmarks/bench_server_fuzz.py``): the server stays
  up, every request is answered as it should be, and nothing leaks;
* the launcher refuses a model whose attention soft-caps logits, at startup.

After each, with the server idle and its cache flushed, every page and fp16 slot is back and
SGLang's idle leak check (strict: a leak raises in the scheduler) has run and found nothing.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.error

import pytest
from servers import FUZZ_KVARN

from benchmarks.harness.fuzz_model import POISON_TOKEN
from benchmarks.harness.server_fuzz import FUZZ_ARGS, KVARN_ERROR, error_text, fuzz, wait_idle
from benchmarks.harness.server_process import ServerProcess

pytestmark = pytest.mark.server
GREEDY = {"max_new_tokens": 12, "temperature": 0.0}


@pytest.fixture(scope="module")
def model(server_pool):
    return server_pool.model_path(FUZZ_KVARN.model)


@pytest.fixture(scope="module")
def server(server_pool):
    return server_pool.get(FUZZ_KVARN, fresh=True)


def _generate(server: ServerProcess, body: dict) -> dict:
    """The answer, or ``{"status": code, "error": message}`` for an HTTP error."""
    try:
        return server.generate(body, timeout=300)
    except urllib.error.HTTPError as err:
        return {"status": err.code, "error": error_text(err.read().decode())}


def _assert_idle_pool_is_whole(server: ServerProcess) -> None:
    wait_idle(server)
    state = server.internal_state()["kvarn"]
    assert state["slots_free"] == state["slots_total"], state
    assert state["pages_free"] == state["pages_total"], state
    assert state["idle_checks"] > 0
    assert "memory leak detected" not in server.log_text()
    assert server.alive(), server.log_tail()


def _ids(n: int, start: int = 3) -> list[int]:
    return [start + (i * 7) % 200 for i in range(n)]


def test_non_finite_requests_fail_alone_and_leave_the_cache_as_it_was(server):
    prefix = _ids(300)
    clean = {
        "a": {"input_ids": prefix + _ids(40, 5), "sampling_params": GREEDY},
        "b": {"input_ids": _ids(90, 11), "sampling_params": GREEDY},
        "c": {"input_ids": _ids(150, 13), "sampling_params": GREEDY | {"n": 2}},
    }
    alone = {name: _generate(server, body) for name, body in clean.items()}
    wait_idle(server)
    _generate(server, clean["a"])  # the prefix is cached again

    def poisoned(ids: list[int], at: int) -> list[int]:
        return [*ids[:at], POISON_TOKEN, *ids[at + 1 :]]

    bad = {  # rid: body; every one writes non-finite K in layer 0
        "after-cached-prefix": {"input_ids": poisoned(prefix + _ids(40, 5), 320)},
        "middle-chunk": {"input_ids": poisoned(_ids(700), 400)},
        # The first sampled token is the poison; the decode step completes page 2 from its
        # fp16 slot (127 prompt tokens + 1).
        "decode": {
            "input_ids": _ids(127),
            "sampling_params": GREEDY | {"logit_bias": {str(POISON_TOKEN): 1000.0}},
        },
    }
    answers: dict[str, dict] = {}

    def send(name: str, body: dict) -> None:
        answers[name] = _generate(server, body)

    jobs = [(f"bad-{rid}", {"sampling_params": GREEDY, "rid": rid} | body)
            for rid, body in bad.items()]  # fmt: skip
    jobs += [(name, body) for name, body in clean.items()]
    threads = [threading.Thread(target=send, args=job) for job in jobs]
    for t in threads:
        t.start()
    streamed = _stream_chat_poison(server)
    for t in threads:
        t.join()
    log = server.log_text()
    for rid in bad:
        answer = answers[f"bad-{rid}"]
        assert answer["status"] == 500 and KVARN_ERROR in answer["error"], answer
        assert "layer 0" in answer["error"], answer
        assert f"request {rid} wrote non-finite K/V (NaN or Inf) in layer 0" in log
    assert KVARN_ERROR in streamed
    for name in clean:
        got = answers[name]
        got, want = (x if isinstance(x, list) else [x] for x in (got, alone[name]))
        assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want], name
        assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in got), name
    again = _generate(server, clean["a"])
    assert again["output_ids"] == alone["a"]["output_ids"]
    assert again["meta_info"]["cached_tokens"] >= 256  # the prefix's full pages
    _assert_idle_pool_is_whole(server)


def _stream_chat_poison(server: ServerProcess) -> str:
    """A streamed chat whose text contains "Ŝ" (bytes C5 9C: the poison is 0x9C); returns
    what the client saw as the error."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                           timeout=300)  # fmt: skip
    seen = []
    try:
        stream = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Ŝ"}], max_tokens=8,
            stream=True,
        )  # fmt: skip
        for chunk in stream:
            seen.append(json.dumps(chunk.model_dump()))
    except openai.APIError as err:
        seen.append(str(err))
    return "\n".join(seen)


def test_a_short_fuzz_seed_leaves_the_server_up_and_leaks_nothing(server):
    result = fuzz(server, seed=0, requests=80, concurrency=8)
    assert result["server_alive"], server.log_tail()
    assert result["problems"] == [], result["problems"]
    assert result["leaks"]["slots_leaked"] == 0 and result["leaks"]["pages_leaked"] == 0
    assert result["log"]["leak_reports"] == 0 and result["log"]["scheduler_exceptions"] == 0
    poisoned = result["by_kind"].get("poison", 0)
    assert poisoned > 0 and result["by_kind_and_result"]["poison/error"] == poisoned
    assert set(result["by_kind"]) >= {"malformed", "stream_disconnect", "client_abort"}
    _assert_idle_pool_is_whole(server)


def test_the_launcher_refuses_a_soft_capping_model_at_startup(model, tmp_path):
    config = json.loads((model / "config.json").read_text())
    softcap = tmp_path / "softcap_model"
    softcap.mkdir()
    for item in model.iterdir():
        (softcap / item.name).write_bytes(item.read_bytes())
    (softcap / "config.json").write_text(json.dumps(config | {"attn_logit_softcapping": 30.0}))
    refused = ServerProcess(softcap, FUZZ_ARGS, tmp_path / "refused.log")
    with pytest.raises(RuntimeError, match="exited"):
        refused.start(timeout=300)
    assert "--kv-cache kvarn does not support attention logit soft-capping" in refused.log_text()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-x"]))
