"""Agent sessions against a running server: what the HiCache tests and ``bench_hicache`` send.

A session is one agent's conversation: a first prompt (a distinct window of real text, so
every session has its own first page and sink page), then turns that append the model's own
answer and a tool result and ask again. Between two turns of a session the other sessions
run (the "idle gap" of an agent waiting on a tool or a human), which is when SGLang's
hierarchical cache moves the session's KV to host memory (or to L3) and back.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, field

from benchmarks.harness.server_process import http, wait_until_flushed

GREEDY = {"temperature": 0.0}


def text_tokens() -> list[int]:
    """The package's English passage as SmolLM2 tokens (about 1,400)."""
    from transformers import AutoTokenizer

    from benchmarks.harness.server_process import SMOLLM2_HF
    from kvarn_sglang.eval.models import read_text

    return AutoTokenizer.from_pretrained(SMOLLM2_HF)(read_text(None)).input_ids


@dataclass
class Session:
    """One agent's token history; ``turns`` records (prompt tokens, cached, output) per turn."""

    sid: int
    history: list[int]
    turns: list[tuple[int, int, list[int]]] = field(default_factory=list)


def make_sessions(n: int, length: int, stride: int = 50) -> list[Session]:
    """``n`` sessions whose first prompts are ``length``-token windows of real text, ``stride``
    tokens apart (distinct first pages)."""
    text = text_tokens()
    while len(text) < (n - 1) * stride + length:
        text = text + text
    return [Session(i, text[i * stride : i * stride + length]) for i in range(n)]


def generate(url: str, ids: list[int], max_new_tokens: int, rid: str | None = None) -> dict:
    payload = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, **GREEDY}}
    if rid is not None:
        payload["rid"] = rid
    return http(f"{url}/generate", payload)


def run_turn(url: str, session: Session, max_new_tokens: int, tool: list[int] | None = None):
    """Send the session's next turn (its history, plus ``tool`` tokens after the first turn)
    and append the answer to its history; returns (cached tokens, output ids, seconds)."""
    if session.turns and tool:
        session.history = session.history + tool
    start = time.monotonic()
    answer = generate(url, session.history, max_new_tokens)
    seconds = time.monotonic() - start
    out, cached = answer["output_ids"], answer["meta_info"]["cached_tokens"]
    session.turns.append((len(session.history), cached, out))
    session.history = session.history + out
    return cached, out, seconds


def hicache_state(url: str) -> dict:
    """The KVarN pool's HiCache entry of ``/get_server_info`` (host pages and bytes)."""
    state = http(f"{url}/get_server_info")["internal_states"][0]["kvarn"]
    return state.get("hicache", {}) | {"pages_free": state["pages_free"]}


def clear_l3_and_flush(url: str) -> None:
    """Empty the server's L3 store (SGLang's ``/hicache/storage-backend/clear``), then its
    prefix cache (device and host) once it is idle: the next request is a miss everywhere."""
    request = urllib.request.Request(f"{url}/hicache/storage-backend/clear", method="POST")
    with urllib.request.urlopen(request, timeout=120) as answer:
        answer.read()
    wait_until_flushed(url)
