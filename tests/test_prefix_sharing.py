"""The prefix-sharing benchmark's workloads, pool sizing and SGLang-driven scheduler (small
runs through SGLang's real ``PrefillAdder``, ``ScheduleBatch``, retraction and radix tree)."""

from __future__ import annotations

import json
import tempfile

import pytest

from benchmarks import bench_prefix_sharing
from benchmarks.harness.pools import ModelShape, make_pool
from benchmarks.harness.sched_context import scheduler_context, write_llama_config
from benchmarks.harness.sglang_sched import SchedServer, check_no_leak
from benchmarks.harness.workloads import describe, make_workload

SHAPE = ModelShape(layers=4, kv_heads=8, head_dim=128)  # 16 KiB per fp16 token
BUDGET = int(0.5e9)


def _run(pool_name: str, workload, *, max_running: int = 64, **kw) -> tuple[SchedServer, dict]:
    """Serve ``workload`` (warm-up first) through SGLang's scheduler classes; the stats."""
    from sglang.srt.configs.model_config import ModelConfig

    pool = make_pool(pool_name, SHAPE, BUDGET, max_running, sinkhorn_iters=0, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_llama_config(tmp, layers=4, kv_heads=8, head_dim=128)
        with scheduler_context(["--page-size", str(pool.page_size)], model) as args:
            server = SchedServer(
                pool, ModelConfig.from_server_args(args), max_running=max_running,
                max_context=describe(workload)["max_sequence"] + 300, chunked_prefill_size=2048,
            )  # fmt: skip
            server.run(workload.warmup)
            server.reset_stats()
            server.run(workload.roots)
            check_no_leak(server)
    return server, server.stats


def _mean_batch(server: SchedServer) -> float:
    batch = server.series["decode_batch"]
    return sum(batch) / max(1, len(batch))


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
    fp16, fp16_p1 = make_pool("fp16", SHAPE, BUDGET, 64), make_pool("fp16-p1", SHAPE, BUDGET, 64)
    fp8 = make_pool("fp8-p128", SHAPE, BUDGET, 64)
    kvarn = make_pool("k4v2_g128", SHAPE, BUDGET, 64)
    assert fp16.cell_bytes == fp16_p1.cell_bytes == 4 * 8 * 512 and fp16_p1.page_size == 1
    assert fp8.cell_bytes == fp16.cell_bytes // 2 and fp8.page_size == 128
    assert fp16_p1.token_capacity == BUDGET // fp16.cell_bytes
    assert fp16.token_capacity == BUDGET // fp16.cell_bytes // 128 * 128
    assert kvarn.cell_bytes == 4 * 8 * 108 and kvarn.num_slots == 64 + 16
    assert kvarn.token_capacity * kvarn.cell_bytes <= BUDGET - kvarn.num_slots * kvarn.slot_bytes
    with pytest.raises(ValueError, match="Unknown pool 'int4'"):
        make_pool("int4", SHAPE, BUDGET, 64)
    with pytest.raises(ValueError, match="Invalid budget_bytes 0"):
        make_pool("fp16", SHAPE, 0, 64)


def test_kvarn_decodes_more_branches_at_once_than_fp16_and_quantizes_each_page_once():
    workload = make_workload("docqa", 4, seed=1)  # 4 documents; fp16 holds about 2
    fp16_server, fp16 = _run("fp16-p1", workload)
    kv_server, kv = _run("k4v2_g128", workload)
    assert fp16_server.tree.evicted > 0, "the budget must be tight for fp16"
    assert _mean_batch(kv_server) > _mean_batch(fp16_server)
    assert kv["cached_tokens"] > fp16["cached_tokens"] > 0
    assert kv["prompt_tokens"] == fp16["prompt_tokens"] and kv["requests"] == fp16["requests"]
    assert kv["reprefilled_tokens"] < fp16["reprefilled_tokens"]
    # every full page written was quantized exactly once, shared pages never again
    assert kv["pages_quantized"] == kv["pages_completed"] > 0
    assert kv["aborted"] == fp16["aborted"] == 0


def test_more_distinct_prefixes_than_slots_complete_through_sglang_admission():
    """Chat over 8 few-shot prefixes (distinct sinks) with 4 running requests on the fewest
    slots the server accepts (5): admission makes requests wait for slots, cached sinks are
    evicted by sink, nothing is aborted, and every page and slot comes back
    (``check_no_leak``)."""
    server, stats = _run("k4v2_g128", make_workload("chat", 8, seed=2), max_running=4,
                         kvarn_slots=5)  # fmt: skip
    assert server.alloc.admissions_waited_for_slots > 0 and server.alloc.sink_evictions > 0
    assert stats["aborted"] == 0 and stats["pages_quantized"] == stats["pages_completed"]
    assert max(server.series["slots_held"]) <= 5


def test_bench_prefix_sharing_smoke(tmp_path, capsys):
    out, png = tmp_path / "prefix.json", tmp_path / "prefix.png"
    argv = ["--smoke", "--workloads", "agentic", "--output", str(out), "--plot", str(png)]
    assert bench_prefix_sharing.main(argv) == 0
    result = json.loads(out.read_text())
    assert {r["pool"] for r in result["rows"]} == {"fp16-p1", "fp8-p128", "k4v2_g128"}
    assert result["git_commit"] and "sglang" in result["versions"]
    assert png.stat().st_size > 0
    assert "| agentic | k4v2_g128 |" in capsys.readouterr().out


if __name__ == "__main__":
    test_more_distinct_prefixes_than_slots_complete_through_sglang_admission()
