"""Decode the way a CUDA-graph replay runs it (static, padded buffers filled by
``init_forward_metadata_out_graph``), on CPU through the reference: same outputs as eager
decode and as the dense spec, each page committed once, every slot back at the end.

The capture itself needs a GPU; these tests pin down everything the captured code reads."""

from __future__ import annotations

import random

import pytest
import torch
from sglang_harness import SimServer

from kvarn_sglang.format.config import KVarNConfig

G = 64
CFG = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=1)


def _run(graph_bs: int | None):
    server = SimServer(CFG, num_pages=24, num_slots=8)
    rng = random.Random(1)
    shared = [rng.randrange(64) for _ in range(G + 5)]
    reqs = [server.start(shared + [rng.randrange(64) for _ in range(n)]) for n in (3, G - 2, 9)]
    assert server.extend(reqs, [len(r.tokens) for r in reqs])
    for step in range(G + 8):  # every request crosses at least one page boundary
        for r in reqs:
            r.tokens.append((step * 7 + r.row) % 64)
        assert server.decode(reqs, graph_bs=graph_bs)
    return server, reqs


def test_graph_decode_matches_eager_decode_and_the_dense_spec():
    _, eager_reqs = _run(None)
    graph, graph_reqs = _run(8)
    for e, g in zip(eager_reqs, graph_reqs, strict=True):
        assert e.kv_len == g.kv_len
        for pos, outs in g.outputs.items():
            for layer, out in enumerate(outs):
                torch.testing.assert_close(out, e.outputs[pos][layer], atol=1e-5, rtol=1e-5)
        for layer in range(len(graph.layers)):
            want = graph.expected(g.tokens[: g.kv_len], layer)
            for pos, outs in g.outputs.items():
                torch.testing.assert_close(outs[layer], want[pos], atol=2e-3, rtol=2e-3)


def test_graph_decode_commits_each_page_once_and_returns_every_slot():
    server, reqs = _run(8)
    store = server.pool.store
    plan = server.backend.plan
    assert plan.in_graph and plan.slot_commits.shape == (8,)  # fixed size, padded with page 0
    assert plan.page_table.shape == (8, server.req_pool.req_to_token.shape[1] // G)
    for r in reqs:
        pages = (server.req_pool.req_to_token[r.row, : r.kv_len : G].long() // G).tolist()
        full = r.kv_len // G
        expected = [0] + [1] * (full - 1) + [0] * (len(pages) - full)
        assert store.commits[pages].tolist() == expected, f"request {r.row}: {pages}"
    for r in reqs:
        server.abort(r)
    assert store.free_slots == store.num_slots and not store.held_mask().any()


def test_a_scheduled_release_survives_the_static_buffer_being_refilled():
    """Graph decode schedules releases from a view of its static commit list and refills
    that list for the next replay; the release must still free the pages it was given."""
    from kvarn_sglang.serving.page_store import PageStore

    store = PageStore(CFG, num_pages=8, num_slots=4, layer_num=1, head_num=1,
                      dtype=torch.float16, device="cpu")  # fmt: skip
    store.assign_slots(torch.tensor([3, 5]))
    static = torch.tensor([3, 0, 0])
    store.begin_pass(static[:1])
    static.copy_(torch.tensor([5, 0, 0]))  # the next replay's pages, before any flush
    store.begin_pass(static[:0])
    assert store.held_mask().nonzero().flatten().tolist() == [5]
    assert store.free_slots == 3


def _run_kernels(graph_bs: int | None):
    """Decode steps through the Triton kernels (interpreted), three requests completing their
    pages from the fp16 slots on the same step (the graph's commit list: 3 pages + padding)."""
    server = SimServer(CFG, num_pages=12, num_slots=8, layers=1, hkv=1)
    rng = random.Random(3)
    reqs = [server.start([rng.randrange(64) for _ in range(2 * G - 2 + i)]) for i in (0, 0, 1)]
    assert server.extend(reqs, [len(r.tokens) for r in reqs])  # the reference fills them
    server.pool.store.use_kernels = True
    for step in range(2):
        for r in reqs:
            r.tokens.append(step + r.row)
        assert server.decode(reqs, graph_bs=graph_bs)
    return server, reqs


def test_graph_decode_kernels_commit_slots_in_place_as_eager_does():
    eager, eager_reqs = _run_kernels(None)
    graph, graph_reqs = _run_kernels(4)
    # The same pages were committed from their slots (read in place, padding skipped): the
    # packed records are identical. Outputs differ only by the split count (the graph's table
    # is as wide as the longest context; test_decode_split_count_does_not_change_the_result).
    assert torch.equal(graph.pool.store.packed[0], eager.pool.store.packed[0])
    counts = graph.pool.store.commits[1:].tolist()  # page 0, the padding, is never a page
    assert counts == eager.pool.store.commits[1:].tolist() and counts.count(1) == 3
    for e, g in zip(eager_reqs, graph_reqs, strict=True):
        for pos, outs in g.outputs.items():
            torch.testing.assert_close(outs[0], e.outputs[pos][0], atol=5e-3, rtol=5e-3)


def test_graph_metadata_needs_the_static_buffers():
    server = SimServer(CFG, num_pages=8, num_slots=4)
    req = server.start([1, 2, 3])
    assert server.extend([req], [3])
    with pytest.raises(ValueError, match="init_cuda_graph_state"):
        server.backend.init_forward_metadata_out_graph(
            type("FB", (), {"forward_mode": type("M", (), {"is_decode": lambda self: True})()})
        )


if __name__ == "__main__":
    test_graph_decode_matches_eager_decode_and_the_dense_spec()
