"""The prefix-sharing benchmark's workloads, pool sizing and SGLang-driven server (small runs)."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_prefix_sharing
from benchmarks.pools import ModelShape, make_pool
from benchmarks.radix_sim import Server, check_no_leak
from benchmarks.workloads import describe, make_workload

SHAPE = ModelShape(layers=4, kv_heads=8, head_dim=128)  # 16 KiB per fp16 token
BUDGET = int(0.5e9)


def _run(pool_name: str, workload, *, max_running: int = 64, **kw) -> tuple[Server, dict]:
    pool = make_pool(pool_name, SHAPE, BUDGET, max_running, sinkhorn_iters=0, **kw)
    info = describe(workload)
    server = Server(pool, max_running=max_running, max_context=info["max_sequence"] + 1)
    return server, server.run(workload)


def test_workloads_are_seeded_and_share_exactly_the_prefixes_they_declare():
    a, b = make_workload("agentic", 6, seed=3), make_workload("agentic", 6, seed=3)
    assert describe(a) == describe(b)
    assert [list(s.prompt()) for s in a.specs()] == [list(s.prompt()) for s in b.specs()]
    assert describe(make_workload("agentic", 6, seed=4)) != describe(a)
    for root in a.roots:  # every task starts with one agent's system prompt + tools
        assert any(list(root.prompt()[: len(w.segment)]) == list(w.segment) for w in a.warmup)
    forks = [s for s in a.specs() if s.gen_len == 0]
    assert forks, "agentic tasks fork"
    for fork in forks:  # n > 1: a prefill-only request, then samples of the same prompt
        assert len(fork.children) >= 1
        assert all(list(c.prompt()) == list(fork.prompt()) for c in fork.children)
        assert len({tuple(c.output) for c in fork.children}) == len(fork.children)
    for name in ("chat", "docqa"):
        assert describe(make_workload(name, 3))["requests"] > 3


def test_make_workload_rejects_unknown_names_and_empty_runs():
    with pytest.raises(ValueError, match="Unknown workload 'tree'"):
        make_workload("tree", 2)
    with pytest.raises(ValueError, match="Invalid tasks 0"):
        make_workload("chat", 0)


def test_make_pool_sizes_by_bytes_and_rejects_bad_input():
    fp16 = make_pool("fp16", SHAPE, BUDGET, 64)
    fp8 = make_pool("fp8", SHAPE, BUDGET, 64)
    int8 = make_pool("int8", SHAPE, BUDGET, 64)
    kvarn = make_pool("k4v2_g128", SHAPE, BUDGET, 64)
    assert fp16.cell_bytes == 4 * 8 * 512 and fp8.cell_bytes == fp16.cell_bytes // 2
    assert int8.cell_bytes == 4 * 8 * 264 and int8.page_size == 1 and not int8.radix
    assert kvarn.cell_bytes == 4 * 8 * 108 and kvarn.num_slots == 64 * 2 + 8
    assert fp16.token_capacity == BUDGET // fp16.cell_bytes // 128 * 128
    assert kvarn.token_capacity * kvarn.cell_bytes <= BUDGET - kvarn.num_slots * kvarn.slot_bytes
    with pytest.raises(ValueError, match="Unknown pool 'int4'"):
        make_pool("int4", SHAPE, BUDGET, 64)
    with pytest.raises(ValueError, match="Invalid budget_bytes 0"):
        make_pool("fp16", SHAPE, 0, 64)


def test_kvarn_keeps_more_branches_resident_than_fp16_and_quantizes_each_page_once():
    workload = make_workload("docqa", 4, seed=1)  # 4 documents; fp16 holds about 2
    fp16_server, fp16 = _run("fp16", workload)
    kv_server, kv = _run("k4v2_g128", workload, kvarn_slots=72)
    assert fp16["evicted_tokens"] > 0, "the budget must be tight for fp16"
    assert kv["peak_running_branches"] > fp16["peak_running_branches"]
    assert kv["hit_tokens"] > fp16["hit_tokens"] > 0
    assert kv["prompt_tokens"] == fp16["prompt_tokens"]
    assert kv["reprefilled_tokens"] < fp16["reprefilled_tokens"]
    # every full page written was quantized exactly once, shared pages never again
    assert kv["pages_quantized"] == kv["pages_completed"] > 0
    assert 0 < kv["slot_peak"] <= 72
    check_no_leak(fp16_server)
    check_no_leak(kv_server)


def test_int8_runs_without_a_radix_cache():
    server, s = _run("int8", make_workload("docqa", 2, seed=0))
    assert s["hit_tokens"] == 0 and s["prefill_tokens"] == s["prompt_tokens"]
    assert s["reprefilled_tokens"] > 0  # every question recomputes its document
    check_no_leak(server)


def test_bench_prefix_sharing_smoke(tmp_path, capsys):
    out = tmp_path / "prefix.json"
    assert (
        bench_prefix_sharing.main(["--smoke", "--workloads", "agentic", "--output", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert {r["pool"] for r in result["rows"]} == {"fp16", "int8", "k4v2_g128"}
    assert result["git_commit"] and "sglang" in result["versions"]
    assert "| agentic | k4v2_g128 |" in capsys.readouterr().out


if __name__ == "__main__":
    test_kvarn_keeps_more_branches_resident_than_fp16_and_quantizes_each_page_once()
