"""SGLang's own benchmark client against the KVarN server, and our agentic workload as its
agentic trace (``benchmarks/harness/sglang_client.py``, ``benchmarks/bench_sglang_serving.py``).

The trace is checked with SGLang's own loader (``AgenticTraceDataset``), the shape
``python -m sglang.benchmark.serving --dataset-name agentic-trace`` replays. The client itself
runs briefly, unchanged, against the run's shared KVarN server (``servers.SMOLLM2_KVARN``):
``--dataset-name generated-shared-prefix``, 2 groups x 2 prompts of a 300-token system prompt,
one request at a time, so every second prompt of a group hits exactly the full pages of its
system prompt, and the pool is whole again after a flush.
"""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from benchmarks.harness.sglang_client import (
    SharedPrefixSizes,
    agentic_trace,
    agentic_trace_args,
    client_command,
    run_client,
)
from benchmarks.harness.workloads import make_workload

PAGE = 128  # SMOLLM2_KVARN's --page-size


def _decode(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def test_the_agentic_workload_loads_as_sglang_agentic_trace(tmp_path):
    pytest.importorskip("datasets")  # sglang.benchmark.datasets imports it
    from sglang.benchmark.datasets.agentic_trace import AgenticTraceDataset

    workload = make_workload("agentic", 3, seed=0, vocab=1000, scale=0.05)
    trace = agentic_trace(workload, _decode)
    leaves = [s for s in workload.specs() if not s.children]
    assert trace["metadata"]["conversations"] == len(leaves) == len(trace["conversations"])
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    args = argparse.Namespace(
        dataset_path=str(path), num_prompts=0, sharegpt_output_len=8, dataset_offset=0,
        agentic_max_turns=None,
    )  # fmt: skip
    rows = AgenticTraceDataset.from_args(args).load(tokenizer=None)
    assert len(rows) == len(leaves)
    for row, leaf in zip(rows, leaves, strict=True):
        assert row.output_len == 8
        rounds = []
        node = leaf
        while node is not None:
            rounds += [node] if node.gen_len else []
            node = node.parent
        assert len(row.prompt) == len(rounds), "one round per request that generates"
        system = [m for m in row.prompt[0] if m["role"] == "system"]
        agent = next(
            a for a in workload.warmup if rounds[-1].segment[: len(a.segment)] == a.segment
        )
        assert system == [{"role": "system", "content": _decode(agent.segment)}]
    # Branches of one fork share every round before it and differ in the round after it.
    by_first = {}
    for conversation in trace["conversations"]:
        by_first.setdefault(json.dumps(conversation[0]), []).append(conversation)
    forked = [c for c in by_first.values() if len(c) > 1]
    assert forked, "the seed forks at least one task"
    for conversations in forked:
        last = {json.dumps(c[-1]["messages"]) for c in conversations}
        assert len(last) == len(conversations), "branches end differently"


def test_agentic_trace_args_name_the_trace(tmp_path):
    args = agentic_trace_args(tmp_path / "t.json", 5, 8)
    assert args[args.index("--dataset-path") + 1] == str(tmp_path / "t.json")
    assert args[args.index("--num-prompts") + 1] == "5"


@pytest.mark.server
def test_sglang_generated_shared_prefix_client_against_kvarn(server_pool, tmp_path):
    from servers import SMOLLM2_KVARN

    from benchmarks.harness.server_workload import flush_and_count

    server = server_pool.get(SMOLLM2_KVARN, fresh=True)
    sizes = SharedPrefixSizes(
        groups=2, prompts_per_group=2, system_prompt_len=300, question_len=16, output_len=4
    )
    command = client_command(
        server.url, sizes.args(), tmp_path / "client.jsonl", concurrency=1, warmup_requests=0
    )
    result = run_client(command, timeout=300)
    assert result["completed"] == 4, result
    assert result["total_output_tokens"] == 4 * 4
    cache = result["cache_report"]
    assert cache["total_prompt_tokens"] >= 4 * (300 + 16)
    # One request at a time after a flush: the first prompt of a group misses, the second hits
    # the full pages of its >= 300-token system prompt (2 of 128 tokens; never its partial page).
    assert cache["total_cached_tokens"] == 2 * 2 * PAGE, cache
    idle = flush_and_count(server.url)
    assert idle["leaked"] == 0, idle


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-k", "loads_as_sglang"]))
