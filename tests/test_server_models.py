"""Model families beyond dense attention on the real engine: stock
``python -m sglang.launch_server --kv-cache kvarn`` on a CPU, one shared server per family.

* Gemma 3 (``tiny_gemma3``: sliding windows of 100 tokens on 3 of 4 layers, over SGLang's one
  KV pool);
* Qwen3-Next (``tiny_qwen3_next``: 3 Gated DeltaNet layers, whose recurrent state stays in
  SGLang's mamba pool, and 1 full-attention layer, whose K/V KVarN stores).

Both from ``benchmarks.harness.tiny_checkpoints``, random weights: the checks are about
consistency, never quality.

Per family, in file order: it starts with the KVarN pool and counts every byte of it; a prefix
hit computes what a miss computes, token for token; its teacher-forced log-probabilities are
``kvarn-sglang eval``'s KVarN forward of the same weights (transformers, fp32), not the
unquantized model's (a window the server ignored would show here); chat and completion with a
shared prefix, ``n=4`` and an aborted stream complete together; flushed and idle, every page
and slot is back.
"""

from __future__ import annotations

import threading

import pytest
import torch
from servers import ServerSpec

from benchmarks.harness.server_process import ServerProcess, prompt_logprobs, wait_until_flushed

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("models")]

GREEDY = {"temperature": 0.0}
COMMON = (
    "--max-running-requests", "4", "--kvarn-slots", "5", "--sleep-on-idle",
    "--skip-server-warmup", "--random-seed", "0", "--enable-cache-report",
)  # fmt: skip
GEMMA3_KVARN = ServerSpec(
    "tiny_gemma3_kvarn",
    "tiny_gemma3",
    ("--kv-cache", "kvarn", "--page-size", "64", "--kvarn-preset", "k4v2_g64",
     "--max-total-tokens", "16384", *COMMON),
)  # fmt: skip
# SGLang caches a hybrid's recurrent states in its mamba radix cache, whose strategies are
# "no_buffer" (page size 1 only, and a KVarN page is G >= 64 tokens) and "extra_buffer" (state
# snapshots, which SGLang enables on CUDA, ROCm, NPU, XPU and MUSA, not on its CPU platform).
# So on the CPU test bed the hybrid runs without a prefix cache; hit == miss is not asked.
QWEN3_NEXT_KVARN = ServerSpec(
    "tiny_qwen3_next_kvarn",
    "tiny_qwen3_next",
    ("--kv-cache", "kvarn", "--page-size", "64", "--kvarn-preset", "k4v2_g64",
     "--max-total-tokens", "16384", "--disable-radix-cache", *COMMON),
)  # fmt: skip
# (spec, KV layers, KV heads, head_dim, the eval's method for the same preset)
FAMILIES = {
    "gemma3": (GEMMA3_KVARN, 4, 2, 64, "k4v2_g64"),
    "qwen3_next": (QWEN3_NEXT_KVARN, 1, 2, 64, "k4v2_g64"),  # KV on the full layer only
}
WINDOWED = {"gemma3"}
PREFIX_CACHED = {"gemma3"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, server_pool):
    spec, *shape = FAMILIES[request.param]
    server = server_pool.get(spec, fresh=True)
    return request.param, server, server_pool.model_path(spec.model), shape


def _prompt(n: int, seed: int) -> list[int]:
    """``n`` byte tokens (3..249: no BOS/EOS/PAD), deterministic."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n,), generator=gen).tolist()


def _greedy(server: ServerProcess, ids: list[int], n: int) -> dict:
    return server.generate({"input_ids": ids, "sampling_params": {"max_new_tokens": n, **GREEDY}})


def test_starts_with_the_kvarn_pool_and_counts_every_byte(family):
    name, server, _, (layers, kv_heads, head_dim, _) = family
    state = server.internal_state()
    kvarn, memory = state["kvarn"], state["memory_usage"]
    assert state["kv_cache_dtype"] == "kvarn" and state["attention_backend"] == "kvarn"
    assert kvarn["layers"] == layers and kvarn["slots_free"] == kvarn["slots_total"] == 5
    assert kvarn["token_capacity"] == memory["token_capacity"] == 16384
    assert abs(memory["kvcache"] - kvarn["pool_bytes"] / 2**30) < 1e-3
    # Tokens per byte against the fp16 pool SGLang sizes for the same model (its cell: layers x
    # KV heads x (K + V) x head_dim x 2 B), every KVarN byte counted: packed pages, fp16 slots
    # and the scratch page. k4v2_g64 at head_dim 64: 57 B per token and KV head instead of 256.
    fp16_per_byte = 1 / (layers * kv_heads * 2 * head_dim * 2)
    ratio = (kvarn["token_capacity"] / kvarn["pool_bytes"]) / fp16_per_byte
    assert 3.5 <= ratio <= 256 / 57, (name, ratio)


def test_a_prefix_cache_hit_computes_what_a_miss_computes(family):
    name, server, _, _ = family
    if name not in PREFIX_CACHED:
        pytest.skip(f"{name} runs without a prefix cache on a CPU (see QWEN3_NEXT_KVARN)")
    prompt = _prompt(600, seed=1)  # 9 full pages: pages before the windows are skipped
    first = _greedy(server, prompt, 24)
    again = _greedy(server, prompt, 24)
    wait_until_flushed(server.url)
    fresh = _greedy(server, prompt, 24)
    assert first["meta_info"]["cached_tokens"] == 0 == fresh["meta_info"]["cached_tokens"]
    assert again["meta_info"]["cached_tokens"] == 576
    assert again["output_ids"] == first["output_ids"] == fresh["output_ids"]


def _input_logprobs(server: ServerProcess, ids: list[int]) -> torch.Tensor:
    return torch.tensor(prompt_logprobs(server, ids))


def test_teacher_forced_logprobs_are_the_evals_kvarn_forward(family, monkeypatch):
    """The server's prompt log-probabilities against ``kvarn-sglang eval``'s forward of the
    same weights (fp32 transformers): far closer to the eval's KVarN forward than to its
    unquantized forward or to a KVarN forward that ignores the sliding windows.

    Measured on tiny_gemma3 (mean |d logprob| over 519 tokens): to the eval's KVarN 0.29, to
    its unquantized forward 1.31, to its window-blind KVarN 2.89; the fp16 server against the
    eval's unquantized forward: 0.052 (random weights with sharp logits: the server's bf16
    K/V round to other 2-bit codes than the eval's fp32 K/V, and the model is very sensitive
    to that; with the eval in bf16 the gap is 0.24)."""
    import kvarn_sglang.eval.attention as eval_attention
    from kvarn_sglang.eval.attention import check_reference, paged_logits
    from kvarn_sglang.eval.models import load_model
    from kvarn_sglang.quant.baselines import get_method
    from kvarn_sglang.quant.page_attention import LayerAttention

    name, server, path, (_, _, head_dim, preset) = family
    ids = _prompt(520, seed=2)
    served = _input_logprobs(server, ids)
    model, _ = load_model(str(path), dtype=torch.float32)
    check_reference(model, torch.tensor([ids]))
    targets = torch.tensor([ids])[:, 1:].T
    kvarn = get_method(preset, head_dim=head_dim)

    def logprobs(method) -> torch.Tensor:
        logits = paged_logits(model, torch.tensor([ids]), method, sink_pages=1)
        return torch.log_softmax(logits, -1)[:-1].gather(1, targets)[:, 0]

    gap = {"twin": logprobs(kvarn), "unquantized": logprobs(None)}
    if name in WINDOWED:
        monkeypatch.setattr(eval_attention, "layer_attention", lambda *a: LayerAttention())
        gap["window_blind"] = logprobs(kvarn)
    gap = {k: float((served - v).abs().mean()) for k, v in gap.items()}
    assert gap["twin"] < 0.35 * gap["unquantized"], (name, gap)
    assert gap["twin"] < 0.25 * gap.get("window_blind", float("inf")), (name, gap)


def test_chat_and_completion_with_a_shared_prefix_n4_and_an_abort(family):
    """Two chats and two completions over one 3-page shared prefix, a request with n=4
    branches and a stream the client drops after three chunks, all at once."""
    import openai

    name, server, _, _ = family
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                           timeout=900)  # fmt: skip
    system = "".join(chr(c) for c in range(97, 123)) * 8  # 208 byte tokens
    outcomes: dict[str, object] = {}

    def run(key: str, fn) -> None:
        try:
            outcomes[key] = fn()
        except Exception as err:  # reported by the assertion below
            outcomes[key] = err

    def chat(question: str, **kw):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return client.chat.completions.create(model="default", messages=messages, **kw)

    def stream():
        s = client.completions.create(model="default", prompt=system + " go", max_tokens=64,
                                      stream=True, temperature=0.0)  # fmt: skip
        chunks = [chunk for _, chunk in zip(range(3), s, strict=False)]
        s.close()
        return chunks

    jobs = {
        "chat0": lambda: chat("hello", max_tokens=8, temperature=0.0),
        "chat1": lambda: chat("again", max_tokens=8, temperature=0.0),
        "completion0": lambda: client.completions.create(
            model="default", prompt=system + " one", max_tokens=8, temperature=0.0
        ),
        "completion1": lambda: client.completions.create(
            model="default", prompt=system + " two", max_tokens=8, temperature=0.0
        ),
        "branches": lambda: chat("branch", max_tokens=8, n=4, temperature=0.8, seed=1),
        "stream": stream,
    }
    run("warm_chat", lambda: chat("warm", max_tokens=1, temperature=0.0))
    run("warm_completion", lambda: client.completions.create(
        model="default", prompt=system + " warm", max_tokens=1, temperature=0.0
    ))  # fmt: skip
    threads = [threading.Thread(target=run, args=job) for job in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = {k: v for k, v in outcomes.items() if isinstance(v, Exception)}
    assert not failed, (name, failed)
    for key in ("chat0", "chat1", "completion0", "completion1"):
        assert outcomes[key].usage.completion_tokens == 8, key
    assert len(outcomes["branches"].choices) == 4 and len(outcomes["stream"]) == 3
    # The shared prefix's full pages (3 of 64 tokens) came from the prefix cache.
    for key in ("chat0", "chat1", "completion0", "completion1"):
        cached = outcomes[key].usage.prompt_tokens_details.cached_tokens
        assert cached >= 192 if name in PREFIX_CACHED else cached == 0, (key, cached)
    assert server.alive(), server.log_tail()


def test_idle_server_has_every_page_and_slot_back(family):
    name, server, _, _ = family
    wait_until_flushed(server.url)
    state = server.internal_state()["kvarn"]
    assert state["slots_free"] == state["slots_total"], (name, state)
    assert state["pages_free"] == state["pages_total"], (name, state)
    assert state["idle_checks"] > 0
    assert "memory leak detected" not in server.log_text()
    assert server.alive(), server.log_tail()


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
