"""Server paths that the other real-engine tests do not reach, against stock SGLang's own fp16
server on the same text (``servers.SMOLLM2_KVARN``, ``servers.SMOLLM2_FP16``; CPU, bf16).

* Pages written by decode and reused through the radix tree: a request's decode completes
  two pages; a request over prompt + output + new text hits them. Two identical hits give the
  same tokens, and the teacher-forced drift of the hit against a fresh prefill (and of the
  decode's own log-probabilities against that prefill) is no larger than the fp16 server's
  drift on the same text, plus a measured margin: that drift is bf16 arithmetic, and a decode
  commit of the wrong positions or a stale slot would be far above it.
* ``--enable-mixed-chunk`` (decode rows inside an extend batch, ``ForwardMode.MIXED``): the
  same greedy tokens for concurrent requests, whose prefills carry a running decode's rows, as
  for the same requests run one at a time (no decode row is ever mixed in), on one server.
* The KVarN server against the fp16 server (independent attention code: SGLang's
  ``torch_native``): the mean |d logprob| between them on a prompt is what ``kvarn-sglang
  eval`` predicts for quantization alone (its KVarN forward against its unquantized one,
  fp32 transformers), within a measured band.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from quality_data import wikitext_path
from servers import SMOLLM2_FP16, SMOLLM2_KVARN, ServerSpec

from benchmarks.harness.server_process import SMOLLM2_HF, ServerProcess, wait_until_flushed

# The group of test_server.py & co., which hold SMOLLM2_KVARN and SMOLLM2_FP16: no new start.
pytestmark = [pytest.mark.server, pytest.mark.xdist_group("server")]

GREEDY = {"temperature": 0.0}
# SMOLLM2_KVARN with decode rows mixed into extend batches (KVarN refuses --dtype float32).
SMOLLM2_KVARN_MIXED = ServerSpec(
    "smollm2_kvarn_mixed", SMOLLM2_HF, (*SMOLLM2_KVARN.args, "--enable-mixed-chunk")
)
# In bf16 a batch's composition alone moves a near-tie greedy token (measured: a plain and a
# mixed bf16 KVarN server part at token 49 of 96): where the tokens of mixed batches first
# differ from those of the request run alone, the alone run's top-2 log-probabilities there
# must be within TIE nats. A wrong mixed batch (decode rows reading another row's pages, a
# stale slot) differs at a confident token.
TIE = 0.1
# The decode writes positions 200..388: it completes page 1 (from its slot; 200..255 decoded)
# and page 2 (all decoded); page 0 is the sink.
PROMPT, DECODE, NEW = 200, 190, 60
G = 128


@pytest.fixture(scope="module")
def text_ids():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_HF)
    return tokenizer(wikitext_path().read_text()[:40000]).input_ids


def _generate(server: ServerProcess, ids: list[int], n: int, logprob_start: int | None = None):
    payload = {"input_ids": ids, "sampling_params": {"max_new_tokens": n, **GREEDY}}
    if logprob_start is not None:
        payload |= {"return_logprob": True, "logprob_start_len": logprob_start}
    return server.generate(payload)


def _input_lp(answer: dict, n: int) -> torch.Tensor:
    """``fp32 [n]``: the log-probability of each of the ``n`` prompt tokens, NaN where the
    answer has none (before its ``logprob_start_len``, and the sequence's first token)."""
    entries = answer["meta_info"]["input_token_logprobs"]
    out = torch.full((n,), float("nan"))
    out[n - len(entries) :] = torch.tensor(
        [float("nan") if lp is None else lp for lp, _, _ in entries]
    )
    return out


def _decode_write_and_hit(server: ServerProcess, ids: list[int]) -> dict:
    """Mean |d logprob| of (1) the decode's log-probabilities and (2) a tree hit over the
    decode-written pages, each against a fresh prefill of the same tokens; and the tokens of
    two identical hits."""
    wait_until_flushed(server.url)
    prompt = ids[:PROMPT]
    first = _generate(server, prompt, DECODE, logprob_start=PROMPT)
    out = first["output_ids"]
    assert len(out) == DECODE, "the decode stopped early: pick another text"
    decode_lp = torch.tensor([lp for lp, _, _ in first["meta_info"]["output_token_logprobs"]])
    full = prompt + out + ids[PROMPT : PROMPT + NEW]
    cached = (PROMPT + DECODE) // G * G  # the pages the first request completed
    # A log-probability from token ``cached + 1`` on needs the forward from position
    # ``cached``: the tree may then match all ``cached`` tokens.
    hits = [_generate(server, full, 8, logprob_start=cached + 1) for _ in range(2)]
    wait_until_flushed(server.url)
    fresh = _generate(server, full, 8, logprob_start=1)
    fresh_lp, hit_lp = _input_lp(fresh, len(full)), _input_lp(hits[0], len(full))
    # the decode's log-probability of output token i is that of token PROMPT + i
    same = (decode_lp - fresh_lp[PROMPT : PROMPT + DECODE]).abs().mean()
    # the hit's first returned entry has no log-probability (SGLang returns None for it)
    after = (hit_lp - fresh_lp)[cached + 1 :].abs()
    assert int(after.isfinite().sum()) >= len(full) - cached - 2, after
    return {
        "cached": [h["meta_info"]["cached_tokens"] for h in hits],
        "fresh_cached": fresh["meta_info"]["cached_tokens"],
        "tokens": [h["output_ids"] for h in hits],
        "same": float(same),
        "after": float(after.nanmean()),
        "expected_cached": cached,
    }


def test_pages_written_by_decode_serve_a_later_request_as_well_as_fp16(server_pool, text_ids):
    """Measured (CPU, bf16, this text): mean |d logprob| at the decoded positions 0.0139
    (KVarN) vs 0.0123 (fp16); over the 64 positions after the cached pages 0.0476 vs 0.0336.
    KVarN's excess after them is the bf16 difference between decode- and prefill-written K/V
    moving codes across rounding boundaries (2-bit V): 0.014 here, 0.003 with a 1,000-token
    prompt (issue 27). A wrong commit or a stale slot puts the drift near 1."""
    kvarn, fp16 = server_pool.get(SMOLLM2_KVARN, SMOLLM2_FP16)
    got = {
        name: _decode_write_and_hit(s, text_ids) for name, s in (("kvarn", kvarn), ("fp16", fp16))
    }
    report = {k: {m: round(v[m], 4) for m in ("same", "after")} for k, v in got.items()}
    print(f"\ndecode-written pages: {report}")
    k = got["kvarn"]
    assert k["cached"] == [k["expected_cached"]] * 2 and k["fresh_cached"] == 0, k["cached"]
    assert k["tokens"][0] == k["tokens"][1], "two identical tree hits gave different tokens"
    assert got["fp16"]["tokens"][0] == got["fp16"]["tokens"][1]
    assert k["same"] <= got["fp16"]["same"] + SAME_MARGIN, report
    assert k["after"] <= got["fp16"]["after"] + AFTER_MARGIN, report


SAME_MARGIN = 0.01  # measured excess 0.0016
AFTER_MARGIN = 0.03  # measured excess 0.014


def test_kvarn_server_differs_from_the_fp16_server_by_what_eval_predicts(server_pool, text_ids):
    """Mean |d logprob| between the KVarN server and the fp16 server over a prompt's positions
    that read quantized pages, against the same between eval's KVarN and unquantized forwards
    of the same tokens (fp32)."""
    from kvarn_sglang.eval.attention import paged_logits
    from kvarn_sglang.eval.models import load_model
    from kvarn_sglang.quant.baselines import get_method

    kvarn, fp16 = server_pool.get(SMOLLM2_KVARN, SMOLLM2_FP16, fresh=True)
    ids = text_ids[:768]
    lp = {
        name: _input_lp(_generate(s, ids, 1, 1), len(ids))[1:]
        for name, s in (("kvarn", kvarn), ("fp16", fp16))
    }
    model, _ = load_model(str(SMOLLM2_HF), dtype=torch.float32)
    targets = torch.tensor([ids])[:, 1:].T
    eval_lp = {}
    for name, method in (("fp16", None), ("kvarn", get_method("k4v2_g128", head_dim=64))):
        logits = paged_logits(model, torch.tensor([ids]), method, sink_pages=1)
        eval_lp[name] = torch.log_softmax(logits, -1)[:-1].gather(1, targets)[:, 0]
    reads = slice(2 * G - 1, None)  # predictions at positions >= 256
    server = float((lp["kvarn"] - lp["fp16"])[reads].abs().mean())
    predicted = float((eval_lp["kvarn"] - eval_lp["fp16"])[reads].abs().mean())
    bf16 = float((lp["fp16"] - eval_lp["fp16"])[reads].abs().mean())
    report = f"server {server:.4f}, eval predicts {predicted:.4f}, fp16 server vs eval {bf16:.4f}"
    print(f"\n{report}")
    assert abs(server - predicted) <= BAND, report


# Measured: server 0.1015, eval predicts 0.0954 (fp16 server vs eval, bf16 alone: 0.0259). A
# server that did not quantize would sit near 0.03, one with twice the error near 0.2.
BAND = 0.04


JOBS = ((0, 40, 48, 0.0), (100, 450, 12, 0.3), (500, 1100, 12, 0.6), (1200, 1333, 12, 0.9))


def _alone(server: ServerProcess, ids: list[int]) -> list[dict]:
    """Each job's greedy tokens and top-2 log-probabilities, one request at a time (a request
    that returns log-probabilities is never mixed, and none runs beside it)."""
    out = []
    for start, end, n, _ in JOBS:
        payload = {"input_ids": ids[start:end], "return_logprob": True, "top_logprobs_num": 2,
                   "sampling_params": {"max_new_tokens": n, **GREEDY}}  # fmt: skip
        answer = server.generate(payload)
        top = answer["meta_info"]["output_top_logprobs"]
        out.append({"tokens": answer["output_ids"], "gap": [t[0][0] - t[1][0] for t in top]})
    return out


def _together(server: ServerProcess, ids: list[int]) -> list[list[int]]:
    """The jobs' greedy tokens, the later three arriving while the first decodes: on a
    mixed-chunk server their prefills carry its decode rows."""
    outs: list = [None] * len(JOBS)

    def run(i: int) -> None:
        start, end, n, delay = JOBS[i]
        time.sleep(delay)
        outs[i] = _generate(server, ids[start:end], n)["output_ids"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(JOBS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def _mixed_prefills(log: str) -> int:
    """Prefill batches logged while a request was running (a mixed-chunk server mixes them)."""
    return sum(
        1 for line in log.splitlines() if "Prefill batch" in line and "#running-req: 0," not in line
    )


def test_mixed_chunk_gives_the_tokens_of_requests_run_alone(server_pool, text_ids):
    server = server_pool.get(SMOLLM2_KVARN_MIXED, fresh=True)
    want = _alone(server, text_ids)
    wait_until_flushed(server.url)
    before = _mixed_prefills(server.log_text())
    got = _together(server, text_ids)
    assert _mixed_prefills(server.log_text()) > before, "no prefill ran beside a decode"
    for i, (tokens, alone) in enumerate(zip(got, want, strict=True)):
        pairs = zip(tokens, alone["tokens"], strict=False)  # EOS may end one sooner
        differ = [j for j, (a, b) in enumerate(pairs) if a != b]
        if not differ:
            assert len(tokens) == len(alone["tokens"]), f"request {i}: stopped elsewhere"
        else:
            j = differ[0]
            print(f"\nrequest {i}: parts at token {j}, top-2 gap {alone['gap'][j]:.4f}")
            assert alone["gap"][j] <= TIE, (
                f"request {i}: token {j} in mixed batches differs from the request run alone, "
                f"where its top-2 log-probabilities are {alone['gap'][j]:.3f} apart"
            )
    assert server.alive(), server.log_tail()


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q", "-s", "-k", "decode"]))
