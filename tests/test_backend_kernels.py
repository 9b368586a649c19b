"""The backend end to end with the Triton kernels (interpreted on CPU): commit on write,
extend and decode attention, eager and graph-shaped decode, through SGLang's real pool,
allocator and tree. What a GPU run executes, minus the compilation."""

from __future__ import annotations

import pytest
import torch
from sglang_harness import SimServer

from kvarn_sglang.format.config import KVarNConfig

G = 64
CFG = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=1)
KERNEL_TOL = 1e-2  # fp16 tensor-core operands (tests/test_kernels_attention.py)


@pytest.mark.parametrize("graph_bs", [None, 4], ids=["eager", "graph"])
def test_backend_with_kernels_matches_the_dense_spec(graph_bs):
    server = SimServer(CFG, num_pages=12, num_slots=6, layers=1, tree="unified")
    server.pool.store.use_kernels = True
    shared = [3] * (G + 2)
    first = server.start(shared + [5] * (G - 4))
    assert server.extend([first], [G + 7]) and server.extend([first], [G - 9])  # chunked
    server.finish(first)
    reqs = [server.start(shared + [t] * 3) for t in (6, 7)]  # prefix hits: one cached page
    assert [r.cached_len for r in reqs] == [G, G]
    assert server.extend(reqs, [5, 5])
    for step in range(G - 4):  # the last steps fill page 1 and start page 2
        for r in reqs:
            r.tokens.append(step % 64)
        assert server.decode(reqs, graph_bs=graph_bs if step >= G - 8 else None)
    for r in reqs:
        want = server.expected(r.tokens[: r.kv_len], 0)
        for pos, outs in r.outputs.items():
            torch.testing.assert_close(outs[0], want[pos], atol=KERNEL_TOL, rtol=KERNEL_TOL)
    pages = [server.req_pool.req_to_token[r.row, G] // G for r in reqs]
    assert server.pool.store.commits[torch.stack(pages).long()].tolist() == [1, 1]


if __name__ == "__main__":
    test_backend_with_kernels_matches_the_dense_spec(4)
