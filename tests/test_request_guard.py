"""A request whose K/V turn non-finite is isolated inside the pass (``request_guard``).

SGLang's real allocator, radix tree and request pool with the KVarN pool and backend
(``SimServer``); one token id makes a layer's K non-finite, as an overflow of a K projection
does. The pass must not raise; the flagged request is the only one flagged, with the first
bad layer; its pages are not committed from that layer on and keep their slots; no fp16
slot holds a non-finite value; cached pages and the other requests' outputs are exactly
what they are without the bad request; after the abort every page and slot is back.
The real scheduler's side (abort through SGLang's result processing, the error to the client)
is proven on the CPU server in ``tests/test_server_isolation.py``.
"""

from __future__ import annotations

import random

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang_harness import SimServer

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.serving.forward_plan import CLEAN
from kvarn_sglang.serving.request_guard import flagged_rows, keep_uncommitted_slots

G = 64
CFG = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=1)
POISON = 63  # the token whose K is non-finite in ``BAD_LAYER``
BAD_LAYER = 1


class PoisonServer(SimServer):
    """``SimServer`` whose "model" writes ``value`` into K in ``BAD_LAYER`` for ``POISON``."""

    def __init__(self, value: float = float("nan"), **kw) -> None:
        super().__init__(CFG, layers=3, **kw)
        self.value = value

    def qkv(self, layer: int, tokens: list[int], start: int):
        q, k, v = super().qkv(layer, tokens, start)
        if layer == BAD_LAYER:
            k = k.clone()
            k[torch.tensor(tokens) == POISON, 0, 3] = self.value
        return q, k, v


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(POISON) for _ in range(n)]


def _assert_slots_finite(server: SimServer) -> None:
    store = server.pool.store
    for layer in range(len(server.layers)):
        assert (
            torch.isfinite(store.slot_k[layer]).all() and torch.isfinite(store.slot_v[layer]).all()
        )


def _packed_of(server: SimServer, pages: list[int]) -> list[torch.Tensor]:
    return [p[pages].clone() for p in server.pool.store.packed]


def _drain(server: SimServer, reqs) -> None:
    for r in reqs:
        server.finish(r)
    server.tree.evict(EvictParams(num_tokens=server.alloc.size))  # empty the radix cache
    store = server.pool.store
    assert store.free_slots == store.num_slots and not store.held_mask().any()
    assert server.alloc.available_size() == server.alloc.size
    assert server.alloc.verify_byte_accounting() == []


def _run_extend(value: float | None):
    """A cached prefix, then one extend pass over three requests; the second carries the
    poison token after the cached prefix unless ``value`` is None."""
    server = PoisonServer(value=float("nan") if value is None else value, num_pages=24)
    rng = random.Random(0)
    shared = _tokens(rng, 2 * G + 3)
    warm = server.start(shared)
    assert server.extend([warm], [len(shared)])
    server.finish(warm)  # the tree now caches 2 full pages (the sink page holds its slot)
    tail = _tokens(rng, 2 * G)
    if value is not None:
        tail[10] = POISON
    reqs = [
        server.start(shared + _tokens(rng, 70)),
        server.start(shared + tail),
        server.start(_tokens(rng, 2 * G + 7)),
    ]
    assert [r.cached_len for r in reqs] == [2 * G, 2 * G, 0]
    cached = server.req_pool.req_to_token[reqs[0].row, : 2 * G : G].long() // G
    before = _packed_of(server, cached.tolist())
    sink_slot = int(server.pool.store.page_slot[cached[0]])
    sink_before = [s[sink_slot].clone() for s in server.pool.store.slot_k]
    assert server.extend(reqs, [len(r.tokens) - r.cached_len for r in reqs])
    return server, reqs, cached, before, sink_slot, sink_before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_an_extend_with_non_finite_k_flags_only_its_request(value):
    server, reqs, cached, before, sink_slot, sink_before = _run_extend(value)
    _, clean_reqs, *_ = _run_extend(None)
    plan, store = server.backend.plan, server.pool.store
    assert flagged_rows(plan, 3) == {1: BAD_LAYER}
    # The other requests compute exactly what they compute without the bad request.
    for r, c in zip((reqs[0], reqs[2]), (clean_reqs[0], clean_reqs[2]), strict=True):
        assert r.outputs.keys() == c.outputs.keys()
        for pos, outs in r.outputs.items():
            for layer, out in enumerate(outs):
                assert torch.equal(out, c.outputs[pos][layer]), (r.row, pos, layer)
    # The bad request's own outputs stay finite (its bad token was stored as zeros).
    assert all(torch.isfinite(o).all() for outs in reqs[1].outputs.values() for o in outs)
    _assert_slots_finite(server)
    # Cached pages: packed records and the sink page's fp16 slot are untouched.
    assert all(
        torch.equal(a, b) for a, b in zip(before, _packed_of(server, cached.tolist()), strict=True)
    )
    assert int(store.page_slot[cached[0]]) == sink_slot
    assert all(torch.equal(s[sink_slot], b) for s, b in zip(store.slot_k, sink_before, strict=True))
    # The bad request's completed pages (past the prefix) are committed below the bad
    # layer only: layer 0 wrote their records, BAD_LAYER and later did not.
    row = reqs[1].row
    own = server.req_pool.req_to_token[row, 2 * G : 4 * G : G].long() // G
    assert (store.packed[0][own] != 0).any()
    for layer in range(BAD_LAYER, len(server.layers)):
        assert (store.packed[layer][own] == 0).all()
    server.abort(reqs[1])
    _drain(server, [reqs[0], reqs[2]])


@pytest.mark.parametrize("graph_bs", [None, 4], ids=["eager", "graph"])
def test_a_decode_step_with_non_finite_k_keeps_the_slot_of_the_page_it_did_not_commit(graph_bs):
    """The bad token completes a page that lives in an fp16 slot: the page is not committed
    in the bad layer and keeps its slot (its release is withdrawn), until the abort."""
    server = PoisonServer(num_pages=24, num_slots=8)
    rng = random.Random(1)
    bad, good = server.start(_tokens(rng, 2 * G - 1)), server.start(_tokens(rng, G + 4))
    assert server.extend([bad, good], [2 * G - 1, G + 4])
    page = int(server.req_pool.req_to_token[bad.row, G]) // G
    bad.tokens.append(POISON)
    good.tokens.append(5)
    assert server.decode([bad, good], graph_bs=graph_bs)
    plan, store = server.backend.plan, server.pool.store
    assert flagged_rows(plan, 2) == {0: BAD_LAYER}
    assert int(store.commits[page]) == 1  # layer 0 committed it
    assert (store.packed[BAD_LAYER][page] == 0).all()
    keep_uncommitted_slots(store, plan, [0])
    assert bool(store.held_mask()[page])  # still in its slot after the releases are applied
    _assert_slots_finite(server)
    want = [server.expected(good.tokens, layer) for layer in range(len(server.layers))]
    for layer, out in enumerate(good.outputs[len(good.tokens) - 1]):
        torch.testing.assert_close(out, want[layer][-1], atol=2e-3, rtol=2e-3)
    server.abort(bad)
    good.tokens.append(7)
    assert server.decode([good], graph_bs=graph_bs)  # the batch goes on
    assert flagged_rows(server.backend.plan, 1) == {}
    _drain(server, [good])


def test_a_clean_pass_flags_nothing_and_commits_as_before():
    server = PoisonServer(num_pages=24)
    rng = random.Random(2)
    reqs = [server.start(_tokens(rng, n)) for n in (3 * G + 1, G)]
    assert server.extend(reqs, [len(r.tokens) for r in reqs])
    plan = server.backend.plan
    assert plan.bad_layer.tolist() == [CLEAN, CLEAN] and flagged_rows(plan, 2) == {}
    pages = server.req_pool.req_to_token[reqs[0].row, : 3 * G : G].long() // G
    assert server.pool.store.commits[pages].tolist() == [0, 1, 1]
    _drain(server, reqs)


if __name__ == "__main__":
    test_an_extend_with_non_finite_k_flags_only_its_request(float("nan"))
