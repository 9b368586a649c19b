"""Faults of a KVarN PD fleet through the real engine (a prefill server, a decode server,
``sglang_router``; mooncake's TCP transport), each with its own fleet:

* the decode server killed while a request's KV is on its way: the client gets an error, the
  prefill server gives back every page and slot, and serves again with a new decode server;
* the prefill server killed while it computes a request: the decode server (which preallocated
  pages and slots for it) gives the request up when the prefill server's heartbeat is lost,
  gives back every page and slot, and serves again with a new prefill server;
* a prefill server and a decode server with different presets: the request is refused at the
  first handshake with a message naming both;
* a decode server short of pages retracts running requests (their packed pages and fp16 slots
  go to host memory, ``serving.retraction_backup``) and resumes them: every request ends with
  the tokens one server with room for all of them produces.

(The fourth fault, a transfer that times out, runs in CI: ``tests/test_pd.py``.) Each case
starts two to four servers: several minutes on 2 CPU cores, outside CI's budget
(``--outside-ci``).
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.error

import pytest
import torch

from benchmarks.harness.pd_fleet import PDServer, Router, pd_fleet
from benchmarks.harness.server_process import (
    SMOLLM2_HF,
    ServerProcess,
    start_together,
    wait_until_flushed,
)

pytestmark = [pytest.mark.server, pytest.mark.outside_ci, pytest.mark.xdist_group("pd_faults")]

KVARN = [
    "--kv-cache", "kvarn", "--page-size", "128", "--max-total-tokens", "16384",
    "--max-running-requests", "4", "--skip-server-warmup", "--random-seed", "0",
]  # fmt: skip
# Heartbeats every second, a prefill server lost after two missed ones (SGLang's defaults:
# 5 s and 2).
FAST_HEARTBEAT = {"SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "1"}


def _ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=gen).tolist()


def _payload(ids: list[int], max_new_tokens: int = 8) -> dict:
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens,
            "temperature": 0}}  # fmt: skip


def _in_background(router: Router, payload: dict) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            outcome["answer"] = router.generate(payload, timeout=300)
        except urllib.error.HTTPError as err:
            outcome["error"] = (err.code, err.read().decode(errors="replace"))
        except Exception as err:  # the router itself failed to answer
            outcome["error"] = (None, repr(err))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def _assert_whole(server, timeout: float = 120.0) -> None:
    """Every page and fp16 slot of ``server`` is free once idle (its prefix cache flushed)."""
    deadline = time.monotonic() + timeout
    while True:
        wait_until_flushed(server.url, timeout=timeout)
        state = server.internal_state()["kvarn"]
        pages, slots = state["pages_free"], state["slots_free"]
        if pages == state["pages_total"] and slots == state["slots_total"]:
            break
        assert time.monotonic() < deadline, state
        time.sleep(1.0)
    assert "memory leak detected" not in server.log_text()


def _preallocated(decode) -> bool:
    state = decode.internal_state()["kvarn"]
    return state["pages_free"] < state["pages_total"]


def test_decode_killed_during_a_transfer(tmp_path):
    long = _ids(3000, seed=1)  # seconds of prefill on the CPU: the kill lands in between
    with pd_fleet(SMOLLM2_HF, KVARN, KVARN, tmp_path) as (prefill, decode, router):
        router.generate(_payload(_ids(50, seed=2)))
        thread, outcome = _in_background(router, _payload(long))
        _wait_for(lambda: _preallocated(decode), 120, "the decode server never preallocated")
        decode.kill()
        thread.join(timeout=300)
        assert "error" in outcome, outcome
        assert prefill.alive()
        _assert_whole(prefill)
        assert "Prefill transfer failed" in prefill.log_text()
        # A new decode server: the prefill server serves again.
        decode2 = PDServer(SMOLLM2_HF, "decode", KVARN, tmp_path / "decode2.log")
        with start_together(decode2), Router.pd([prefill], [decode2], tmp_path / "r2.log") as r2:
            answer = r2.generate(_payload(_ids(300, seed=3)))
            assert len(answer["output_ids"]) == 8
            _assert_whole(decode2)


def test_prefill_killed_during_a_request(tmp_path):
    long = _ids(3000, seed=4)
    decode_env = FAST_HEARTBEAT
    prefill = PDServer(SMOLLM2_HF, "prefill", KVARN, tmp_path / "prefill.log")
    decode = PDServer(SMOLLM2_HF, "decode", KVARN, tmp_path / "decode.log", env=decode_env)
    with start_together(prefill, decode):
        with Router.pd([prefill], [decode], tmp_path / "router.log") as router:
            router.generate(_payload(_ids(50, seed=5)))
            thread, outcome = _in_background(router, _payload(long))
            _wait_for(lambda: _preallocated(decode), 120, "the decode server never preallocated")
            prefill.kill()
            thread.join(timeout=300)
            assert "error" in outcome, outcome
        _wait_for(
            lambda: "Lost connection with prefill" in decode.log_text(), 120, "no lost heartbeat"
        )
        assert decode.alive()
        _assert_whole(decode)
        prefill2 = PDServer(SMOLLM2_HF, "prefill", KVARN, tmp_path / "prefill2.log")
        with start_together(prefill2), Router.pd([prefill2], [decode], tmp_path / "r2.log") as r2:
            answer = r2.generate(_payload(_ids(300, seed=6)))
            assert len(answer["output_ids"]) == 8
            _assert_whole(decode)


def test_mismatched_presets_are_refused_at_the_handshake(tmp_path):
    """A k2v2 prefill server and a k4v2 decode server: the request fails at once with a message
    naming both presets (not served wrong), and the decode server keeps running."""
    k2v2 = [*KVARN, "--kvarn-preset", "k2v2_g128"]
    with pd_fleet(SMOLLM2_HF, k2v2, KVARN, tmp_path) as (prefill, decode, router):
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as refused:
            router.generate(_payload(_ids(200, seed=20)), timeout=300)
        body = refused.value.read().decode(errors="replace")
        assert "--kvarn-preset: prefill k2v2_g128, decode k4v2_g128" in body, body
        assert time.monotonic() - started < 120  # the prefill server was told, not timed out
        assert decode.alive() and prefill.alive()
        _assert_whole(decode)
        _assert_whole(prefill)


def test_decode_retraction_resumes_with_the_same_tokens(tmp_path):
    """Four requests of 200 prompt tokens and 300 new ones need 16 pages; the decode server
    has 12: it retracts some and resumes them from host memory."""
    tight = [a for a in KVARN]
    tight[tight.index("16384")] = str(12 * 128)
    decode_args = [*tight, "--num-reserved-decode-tokens", "128"]
    prompts = [_ids(200, seed=10 + i) for i in range(4)]
    with pd_fleet(SMOLLM2_HF, KVARN, decode_args, tmp_path) as (_, decode, router):
        runs = [_in_background(router, _payload(p, max_new_tokens=300)) for p in prompts]
        for thread, _ in runs:
            thread.join(timeout=1200)
        pd_answers = [outcome for _, outcome in runs]
        assert all("answer" in o for o in pd_answers), pd_answers
        retractions = sum(o["answer"]["meta_info"].get("num_retractions", 0) for o in pd_answers)
        assert retractions > 0, "the decode server never retracted"
        _assert_whole(decode)
    with ServerProcess(SMOLLM2_HF, KVARN, tmp_path / "single.log") as single:
        for p, o in zip(prompts, pd_answers, strict=True):
            assert single.generate(_payload(p, 300))["output_ids"] == o["answer"]["output_ids"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "--outside-ci", "-k", "retraction"]))
