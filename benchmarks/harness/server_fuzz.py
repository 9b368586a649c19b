"""A seeded request fuzzer for a running SGLang server, and what it checks afterwards.

``make_jobs(seed, n)`` draws ``n`` requests of these kinds (weights in ``KINDS``):

* ``generate``: ``/generate`` with token ids, 1 token to the context limit, greedy or sampled;
* ``shared_prefix``: one of four prefixes (64 to 512 tokens) plus a suffix (radix hits);
* ``branches``: ``n`` = 2 to 4 samples of one prompt (``/generate`` or ``/v1/completions``);
* ``long_decode``: 300 to 450 generated tokens after a short prompt, also in a burst of six
  every 100 requests: SGLang admits them on an estimate of their output, together they
  outgrow the pool while they decode, and SGLang retracts requests;
* ``over_context``: a prompt longer than the context: a clear 400 error is expected;
* ``stream_disconnect``: a streamed ``/generate`` or chat completion that the client drops
  after a few chunks (the socket is closed mid-generation);
* ``client_abort``: a long generation, streamed or not, cancelled through ``/abort_request``;
* ``flush``: ``/flush_cache`` while requests run (refused while busy, or done);
* ``malformed``: empty prompt, token ids out of the vocabulary or negative, negative or
  non-integer ``max_new_tokens``, unknown fields, a body that is not JSON;
* ``poison``: the planted token of ``benchmarks.harness.fuzz_model`` (non-finite K in layer 0)
  in the prompt, in a middle chunk of a chunked prefill, or forced as the first sampled token
  (``logit_bias``), plain or streamed: the request must fail with the KVarN error and nothing
  else may.

``run_jobs`` sends them from ``concurrency`` threads and classifies every answer; ``check``
lists what a robust server must satisfy (every well-formed request completed or got a clear
error, no request unanswered unless the client hung up, the poisoned ones failed with the
KVarN error). ``pool_leaks`` reads the KVarN pool of an idle, flushed server.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from benchmarks.harness.fuzz_model import POISON_TOKEN, VOCAB
from benchmarks.harness.server_process import ServerProcess

KINDS = {
    "generate": 24, "shared_prefix": 14, "branches": 8, "long_decode": 4, "over_context": 4,
    "stream_disconnect": 9, "client_abort": 6, "flush": 3, "malformed": 16, "poison": 10,
}  # fmt: skip
KVARN_ERROR = "non-finite K/V"


@dataclass
class Job:
    kind: str
    variant: str
    path: str
    body: object  # a JSON payload, or raw bytes for a malformed body
    stream_chunks: int | None = None  # read this many chunks, then hang up
    abort_after_s: float | None = None
    rid: str | None = None


@dataclass
class Outcome:
    kind: str
    variant: str
    status: int | None  # HTTP status; None if unanswered
    result: str  # completed | error | disconnected | unanswered
    message: str = ""
    finish: list[str] = field(default_factory=list)


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, POISON_TOKEN) for _ in range(n)]


def make_jobs(seed: int, n: int, context: int) -> list[Job]:
    """``n`` requests drawn from ``KINDS`` with ``random.Random(seed)`` (lengths in tokens,
    ``context`` the server's context length)."""
    rng = random.Random(seed)
    prefixes = [_ids(rng, k) for k in (64, 130, 300, 512)]
    kinds, weights = zip(*KINDS.items(), strict=True)
    jobs = []
    for i in range(n):
        # Every 100 requests, a burst of long decodes: together they outgrow the pool.
        kind = "long_decode" if i % 100 in range(20, 26) else rng.choices(kinds, weights)[0]
        jobs.append(_job(rng, kind, i, prefixes, context))
    return jobs


def _sampling(rng: random.Random, max_new: int | None = None) -> dict:
    params = {"max_new_tokens": max_new or rng.choice([1, 2, 8, 16, 32, 64])}
    params["temperature"] = rng.choice([0.0, 0.0, 0.7, 1.0])
    if rng.random() < 0.3:
        params["ignore_eos"] = True
    return params


def _job(rng: random.Random, kind: str, i: int, prefixes, context: int) -> Job:
    rid = f"fuzz-{i}"
    length = rng.choice([1, rng.randrange(2, 64), rng.randrange(64, 400), rng.randrange(400, 900)])
    if kind == "generate":
        body = {"input_ids": _ids(rng, length), "sampling_params": _sampling(rng), "rid": rid}
        return Job(kind, "ids", "/generate", body)
    if kind == "shared_prefix":
        ids = rng.choice(prefixes) + _ids(rng, rng.randrange(1, 200))
        return Job(kind, "ids", "/generate", {"input_ids": ids, "sampling_params": _sampling(rng)})
    if kind == "branches":
        ids, n = rng.choice(prefixes) + _ids(rng, rng.randrange(1, 100)), rng.randrange(2, 5)
        if rng.random() < 0.5:
            params = _sampling(rng) | {"n": n, "temperature": 0.8}
            return Job(
                kind, "generate_n", "/generate", {"input_ids": ids, "sampling_params": params}
            )
        body = {"model": "default", "prompt": ids, "n": n, "max_tokens": 16, "temperature": 0.8}
        return Job(kind, "completions_n", "/v1/completions", body)
    if kind == "long_decode":
        params = {"max_new_tokens": rng.randrange(300, 450), "temperature": 0.7}
        body = {"input_ids": _ids(rng, rng.randrange(32, 160)), "sampling_params": params}
        return Job(kind, "ids", "/generate", body)
    if kind == "over_context":
        ids = _ids(rng, context + rng.randrange(1, 400))
        return Job(kind, "ids", "/generate", {"input_ids": ids, "sampling_params": _sampling(rng)})
    if kind == "stream_disconnect":
        chunks = rng.randrange(1, 5)
        if rng.random() < 0.5:
            body = {"input_ids": _ids(rng, length), "stream": True,
                    "sampling_params": _sampling(rng, 64) | {"ignore_eos": True}}  # fmt: skip
            return Job(kind, "generate", "/generate", body, stream_chunks=chunks)
        text = "tell me a story " * rng.randrange(1, 40)
        body = {"model": "default", "stream": True, "max_tokens": 64,
                "messages": [{"role": "user", "content": text}]}  # fmt: skip
        return Job(kind, "chat", "/v1/chat/completions", body, stream_chunks=chunks)
    if kind == "client_abort":
        body = {"input_ids": _ids(rng, length), "rid": rid,
                "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}  # fmt: skip
        after, streamed = rng.uniform(0.05, 1.5), rng.random() < 0.5
        if streamed:
            body["stream"] = True
        chunks = 10**6 if streamed else None
        variant = "stream" if streamed else "plain"
        return Job(kind, variant, "/generate", body, chunks, abort_after_s=after, rid=rid)
    if kind == "flush":
        return Job(kind, "flush", "/flush_cache", None)
    if kind == "malformed":
        return _malformed(rng, rid)
    return _poison(rng, rid, prefixes)


def _malformed(rng: random.Random, rid: str) -> Job:
    ok = {"max_new_tokens": 4}
    variants = {
        "empty_ids": {"input_ids": [], "sampling_params": ok},
        "empty_text": {"text": "", "sampling_params": ok},
        "id_above_vocab": {"input_ids": [5, VOCAB + 7, 9], "sampling_params": ok},
        "negative_id": {"input_ids": [5, -3, 9], "sampling_params": ok},
        "negative_max_tokens": {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": -5}},
        "string_max_tokens": {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": "many"}},
        "unknown_field": {"input_ids": [5, 6, 7], "sampling_params": ok, "no_such_field": 1},
        "unknown_sampling_field": {"input_ids": [5, 6, 7], "sampling_params": {"bogus": 2}},
        "not_json": b"{this is not json",
        "chat_negative_max_tokens": {
            "model": "default",
            "max_tokens": -1,
            "messages": [{"role": "user", "content": "hi"}],
        },
    }
    variant = rng.choice(sorted(variants))
    path = "/v1/chat/completions" if variant.startswith("chat") else "/generate"
    return Job("malformed", variant, path, variants[variant], rid=rid)


def _poison(rng: random.Random, rid: str, prefixes) -> Job:
    variant = rng.choice(["prompt", "shared_prefix", "middle_chunk", "decode", "decode_stream"])
    params = {"max_new_tokens": 16, "temperature": 0.0}
    if variant == "prompt":
        ids = _ids(rng, rng.randrange(2, 300))
        ids[rng.randrange(len(ids))] = POISON_TOKEN
    elif variant == "shared_prefix":
        ids = rng.choice(prefixes) + _ids(rng, 40)
        ids[-rng.randrange(1, 40)] = POISON_TOKEN
    elif variant == "middle_chunk":  # chunked prefill of 256-token chunks: the 2nd of 3+
        ids = _ids(rng, rng.randrange(600, 900))
        ids[rng.randrange(260, 500)] = POISON_TOKEN
    else:  # the first sampled token is the poison: the decode step that reads it fails
        ids = _ids(rng, rng.choice([63, 127, rng.randrange(2, 300)]))
        params["logit_bias"] = {str(POISON_TOKEN): 1000.0}
    body = {"input_ids": ids, "sampling_params": params, "rid": rid}
    if variant == "decode_stream":
        body["stream"] = True
        return Job("poison", variant, "/generate", body, stream_chunks=10**6, rid=rid)
    return Job("poison", variant, "/generate", body, rid=rid)


def _post(url: str, job: Job, timeout: float) -> Outcome:
    data = job.body if isinstance(job.body, bytes) else json.dumps(job.body).encode()
    if job.body is None:
        data = b""
    request = urllib.request.Request(
        url + job.path, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            text = answer.read().decode(errors="replace")
            status = answer.status
    except urllib.error.HTTPError as err:
        message = error_text(err.read().decode(errors="replace"))
        return Outcome(job.kind, job.variant, err.code, "error", message[:300])
    except (OSError, http.client.HTTPException) as err:
        return Outcome(job.kind, job.variant, None, "unanswered", repr(err)[:300])
    return Outcome(job.kind, job.variant, status, "completed", "", _finishes(text))


def _finishes(text: str) -> list[str]:
    """Finish reasons of a (non-streamed) JSON answer of /generate or /v1/*."""
    try:
        answer = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return ["unparsed"]
    items = answer if isinstance(answer, list) else [answer]
    reasons = []
    for item in items:
        if "choices" in item:
            reasons += [str(c.get("finish_reason")) for c in item["choices"]]
        elif "meta_info" in item:
            reasons.append(str((item["meta_info"].get("finish_reason") or {}).get("type")))
    return reasons


def _stream(url: str, job: Job, timeout: float) -> Outcome:
    """POST a streamed request, read ``job.stream_chunks`` data lines, then hang up."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", job.path, json.dumps(job.body), {"Content-Type": "application/json"})
        answer = conn.getresponse()
        if answer.status != 200:
            body = error_text(answer.read().decode(errors="replace"))
            return Outcome(job.kind, job.variant, answer.status, "error", body[:300])
        seen, errors = 0, []
        while seen < job.stream_chunks:
            line = answer.readline()
            if not line:
                break
            line = line.decode(errors="replace").strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            seen += 1
            if '"error"' in line or '"abort"' in line:
                errors.append(error_text(line)[:300])
        if errors:
            return Outcome(job.kind, job.variant, 200, "error", errors[-1])
        finished = seen < job.stream_chunks
        return Outcome(job.kind, job.variant, 200, "completed" if finished else "disconnected")
    except (OSError, http.client.HTTPException) as err:
        return Outcome(job.kind, job.variant, None, "unanswered", repr(err)[:300])
    finally:
        conn.close()


def _run(url: str, job: Job, timeout: float) -> Outcome:
    send = _post if job.stream_chunks is None else _stream
    if job.abort_after_s is None:
        return send(url, job, timeout)
    timer = threading.Timer(job.abort_after_s, _abort, (url, job.rid))
    timer.start()
    try:
        outcome = send(url, job, timeout)
    finally:
        timer.cancel()
    cancelled = "abort" in outcome.finish or (
        outcome.result == "error" and "bort" in outcome.message
    )
    if outcome.status == 200 and cancelled:
        outcome.result = "disconnected"  # the client cancelled it
    return outcome


def _abort(url: str, rid: str) -> None:
    body = json.dumps({"rid": rid}).encode()
    request = urllib.request.Request(url + "/abort_request", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with contextlib.suppress(OSError):
        urllib.request.urlopen(request, timeout=30).read()


def run_jobs(url: str, jobs: list[Job], concurrency: int, timeout: float = 600.0) -> list[Outcome]:
    """Send ``jobs`` from ``concurrency`` threads; outcomes in job order."""
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda job: _run(url, job, timeout), jobs))


def check(outcomes: list[Outcome]) -> list[str]:
    """What went wrong, one line per request (empty when the server behaved)."""
    problems = []
    for i, o in enumerate(outcomes):
        where = f"request {i} ({o.kind}/{o.variant})"
        if o.result == "unanswered":
            problems.append(f"{where}: no answer: {o.message}")
        elif o.kind == "poison":
            if o.result != "error" or KVARN_ERROR not in o.message:
                problems.append(f"{where}: expected the KVarN error, got {o.result} {o.message}")
        elif KVARN_ERROR in o.message:
            problems.append(f"{where}: a clean request got the KVarN error")
        elif o.kind in ("generate", "shared_prefix", "branches", "long_decode"):
            bad = [f for f in o.finish if f not in ("length", "stop")]
            if o.result != "completed" or bad or not o.finish:
                problems.append(f"{where}: {o.result} {o.status} {o.finish} {o.message}")
        elif (
            o.kind in ("over_context", "malformed")
            and o.result == "error"
            and (not 400 <= (o.status or 0) < 500 or not o.message)
        ):
            problems.append(f"{where}: not a clear client error: {o.status} {o.message}")
    return problems


def summarize(outcomes: list[Outcome]) -> dict:
    """Counts by kind, result and error (status and the message's first words)."""
    errors = Counter()
    for o in outcomes:
        if o.result == "error":
            words = re.sub(r"\d+", "N", error_text(o.message)).split()[:10]
            errors[f"{o.kind}/{o.variant}: {o.status} {' '.join(words)}"] += 1
    return {
        "requests": len(outcomes),
        "by_kind": dict(Counter(o.kind for o in outcomes)),
        "by_result": dict(Counter(o.result for o in outcomes)),
        "by_kind_and_result": dict(Counter(f"{o.kind}/{o.result}" for o in outcomes)),
        "client_aborts": sum(o.kind in ("client_abort", "stream_disconnect") for o in outcomes),
        "errors": dict(sorted(errors.items())),
    }


def error_text(message: str) -> str:
    """The human-readable message of an error body (SGLang's and OpenAI's JSON shapes)."""
    text = message.removeprefix("data:").strip()
    with contextlib.suppress(json.JSONDecodeError, AttributeError, TypeError):
        body = json.loads(text)
        inner = body.get("error", body)
        inner = inner.get("message", inner) if isinstance(inner, dict) else inner
        finish = (body.get("meta_info") or {}).get("finish_reason") or {}
        text = str(finish.get("message") or body.get("message") or inner)
    return text


def pool_leaks(state: dict) -> dict:
    """Pages and fp16 slots not back in an idle, flushed KVarN server (``kvarn`` entry of
    its internal state)."""
    return {
        "slots_leaked": state["slots_total"] - state["slots_free"],
        "pages_leaked": state["pages_total"] - state["pages_free"],
        "idle_checks": state["idle_checks"],
    }


def wait_idle(server, timeout: float = 300.0) -> None:
    """Flush the server's cache as soon as it is idle (a flush is refused while busy)."""
    deadline = time.monotonic() + timeout
    while not server.flush_cache():
        if time.monotonic() > deadline:
            raise TimeoutError("the server never became idle")
        time.sleep(0.5)


# ------------------------------------------------------------------ one run
CONTEXT = 1024
FUZZ_ARGS = [
    "--kv-cache", "kvarn", "--page-size", "64", "--kvarn-preset", "k4v2_g64",
    "--max-running-requests", "4", "--kvarn-slots", "10", "--max-total-tokens", "1536",
    "--chunked-prefill-size", "256", "--context-length", str(CONTEXT),
    "--schedule-conservativeness", "0.3",
    "--sleep-on-idle", "--skip-server-warmup", "--random-seed", "0",
]  # fmt: skip
# Server configurations a run cycles through (``profile_args``): the fuzz pool with its
# 256-token chunks, and small page-multiple chunks, alone and with mixed chunks (SGLang then
# lowers a continued chunk's budget by the running requests, so chunks end inside pages).
PROFILES = {
    "chunk256": [],
    "chunk128_mixed": ["--chunked-prefill-size", "128", "--enable-mixed-chunk"],
    "chunk64": ["--chunked-prefill-size", "64"],
    "chunk192_mixed": ["--chunked-prefill-size", "192", "--enable-mixed-chunk"],
}


def profile_args(name: str) -> list[str]:
    """``FUZZ_ARGS`` with the chunking of profile ``name`` (``PROFILES``)."""
    if name not in PROFILES:
        raise ValueError(f"Unknown fuzz profile {name!r}: expected one of {sorted(PROFILES)}")
    extra = PROFILES[name]
    args = list(FUZZ_ARGS)
    if "--chunked-prefill-size" in extra:
        i = args.index("--chunked-prefill-size")
        del args[i : i + 2]
    return args + extra


# Log lines counted in the result: SGLang's idle leak check and a dead scheduler must stay at
# 0; retractions show that memory ran short.
LOG_SIGNS = {
    "leak_reports": "memory leak detected",
    "scheduler_exceptions": "Scheduler hit an exception",
    "retractions": "KV cache pool is full. Retract requests.",
    "kvarn_aborts": "wrote non-finite K/V",
}


def fuzz(server: ServerProcess, seed: int, requests: int, concurrency: int) -> dict:
    """One fuzz run against a started ``server``; the result dict of the JSON."""
    jobs = make_jobs(seed, requests, CONTEXT)
    started = time.monotonic()
    outcomes = run_jobs(server.url, jobs, concurrency)
    seconds = time.monotonic() - started
    alive = server.alive() if server.process is not None else True
    wait_idle(server)
    state = server.internal_state()["kvarn"]
    log = server.log_text() if server.process is not None else ""
    return {
        "seed": seed,
        "concurrency": concurrency,
        "seconds": round(seconds, 1),
        "server_alive": alive,
        **summarize(outcomes),
        "leaks": pool_leaks(state),
        "log": {name: log.count(sign) for name, sign in LOG_SIGNS.items()},
        "problems": check(outcomes),
    }
