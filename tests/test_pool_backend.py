"""KVarN pool, allocator and backend driven through SGLang's real classes (CPU, reference path)."""

from __future__ import annotations

import random

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang_harness import SimServer

from kvarn_sglang.format.config import KVarNConfig

G = 64
CFG = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=1)


def _check_outputs(server: SimServer, req) -> None:
    for layer in range(len(server.layers)):
        want = server.expected(req.tokens[: req.kv_len], layer)
        for pos, outs in req.outputs.items():
            torch.testing.assert_close(outs[layer], want[pos], atol=2e-3, rtol=2e-3)


def test_cold_request_in_chunks_and_decode_matches_the_dense_spec():
    server = SimServer(CFG)
    tokens = [random.Random(0).randrange(64) for _ in range(2 * G + 12)]
    req = server.start(tokens)
    for n in (G - 1, G + 3, 3):
        assert server.extend([req], [n])
    for _ in range(5):  # crosses into the third page
        assert server.decode([req])
    assert req.kv_len == 2 * G + 10
    _check_outputs(server, req)
    store = server.pool.store
    pages = server.req_pool.req_to_token[req.row, : req.kv_len : G].long() // G
    assert store.commits[pages].tolist() == [0, 1, 0]  # sink fp16, page 1 packed, tail fp16
    assert store.held_mask()[pages].tolist() == [True, False, True]


def test_prefix_hit_computes_what_a_miss_computes_and_quantizes_shared_pages_once():
    server = SimServer(CFG)
    rng = random.Random(1)
    prompt = [rng.randrange(64) for _ in range(3 * G + 5)]
    a = server.start(prompt)
    assert server.extend([a], [len(prompt)])
    server.finish(a)
    b_tokens = prompt[: 2 * G + 10] + [rng.randrange(64) for _ in range(40)]
    b = server.start(b_tokens)
    assert b.cached_len == 2 * G
    assert server.extend([b], [len(b_tokens) - b.cached_len])
    b.tokens.append(7)
    assert server.decode([b])
    _check_outputs(server, b)
    pages = server.req_pool.req_to_token[b.row, : 3 * G : G].long() // G
    store = server.pool.store
    assert store.commits[pages].tolist() == [0, 1, 0]  # page 2 is b's own (diverged), not yet full
    server.finish(b)


def test_batched_extend_and_decode_of_requests_sharing_a_prefix():
    server = SimServer(CFG)
    rng = random.Random(2)
    base = [rng.randrange(64) for _ in range(G + 20)]
    first = server.start(base)
    assert server.extend([first], [len(base)])
    server.finish(first)
    reqs = [server.start(base + [rng.randrange(64) for _ in range(G)]) for _ in range(3)]
    assert all(r.cached_len == G for r in reqs)
    assert server.extend(reqs, [len(r.tokens) - G for r in reqs])
    for r in reqs:
        r.tokens += [rng.randrange(64) for _ in range(3)]
    for _ in range(3):
        assert server.decode(reqs)
    for r in reqs:
        _check_outputs(server, r)
        server.finish(r)


def _tree_sinks(server: SimServer) -> set[int] | None:
    """Sink pages of the radix tree (its root's children); None for the unified tree, whose
    structure is not exposed."""
    if not isinstance(server.tree, RadixCache):
        return None
    return {int(child.value[0]) // G for child in server.tree.root_node.children.values()}


def _assert_accounting(server: SimServer, running) -> None:
    """Every page is free, in the tree or owned by exactly one running request; fp16 slots are
    held only by sink pages and running requests' last pages; tree pages past the sink were
    quantized exactly once, sink pages never."""
    free = server.alloc.free_pages.tolist()
    empty = server.tree.evictable_size() + server.tree.protected_size() == 0
    tree = torch.zeros(0) if empty else server.tree.all_values_flatten().long()
    tree_pages = set((tree // G).tolist())
    owned, running_allowed = [], set()
    for r in running:
        row = server.req_pool.req_to_token[r.row, r.cached_len : r.kv_len].long()
        owned += sorted(set((row // G).tolist()))
        pages = (server.req_pool.req_to_token[r.row, : r.kv_len : G].long() // G).tolist()
        running_allowed |= set(pages[: CFG.sink_pages]) | set(pages[-1:])
    every = free + sorted(tree_pages) + owned
    assert sorted(every) == list(range(1, server.alloc.num_pages + 1)), "page leaked or shared"
    store = server.pool.store
    held = store.held_mask()
    holders = set(held.nonzero().flatten().tolist())
    sinks = _tree_sinks(server)
    tree_holders = holders & tree_pages
    if sinks is not None:
        assert tree_holders == sinks, f"tree slots {sorted(tree_holders)}, sinks {sorted(sinks)}"
    assert holders <= tree_holders | running_allowed, f"slots held by {sorted(holders)}"
    assert store.free_slots + len(holders) == store.num_slots
    for page in tree_pages:
        want = 0 if page in tree_holders else 1
        assert store.commits[page] == want, (
            f"tree page {page} quantized {int(store.commits[page])}x"
        )


@pytest.mark.parametrize("tree", ["radix", "unified"])
def test_random_operations_leave_no_leak_and_stay_exact(tree):
    server = SimServer(CFG, num_pages=40, num_slots=40, tree=tree)
    rng = random.Random(3)
    prefixes = [[rng.randrange(64) for _ in range(rng.randrange(G, 3 * G))] for _ in range(3)]
    running = []
    ops = 0
    while ops < 2000:
        ops += 1
        op = rng.random()
        if op < 0.2 and len(running) < 4:
            tokens = rng.choice(prefixes)[: rng.randrange(1, 3 * G)] + [
                rng.randrange(64) for _ in range(rng.randrange(1, G))
            ]
            req = server.start(tokens)
            if req is not None:
                running.append(req)
        elif op < 0.45 and running:
            r = rng.choice(running)
            left = len(r.tokens) - r.kv_len
            if left > 0 and not server.extend([r], [rng.randrange(1, left + 1)]):
                server.abort(r)
                running.remove(r)
        elif op < 0.8 and running:
            batch = [r for r in running if r.kv_len > 0 and r.kv_len >= len(r.tokens)]
            for r in batch:
                r.tokens.append(rng.randrange(64))
            if batch and not server.decode(batch):
                for r in batch:
                    r.tokens.pop()
        elif op < 0.95 and running:
            r = running.pop(rng.randrange(len(running)))
            if r.kv_len:
                if ops % 20 == 0:
                    _check_outputs(server, r)
                server.finish(r)
            else:
                server.abort(r)
        else:
            server.tree.evict(EvictParams(num_tokens=rng.randrange(1, 4) * G))
        _assert_accounting(server, running)
    for r in running:
        server.finish(r)
    server.tree.evict(EvictParams(num_tokens=10**6))
    assert server.alloc.available_size() == 40 * G
    assert server.pool.store.free_slots == server.pool.store.num_slots
    assert not server.pool.store.held_mask().any()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_decode_commits_a_completed_page_after_its_attention(monkeypatch):
    """A decode step's completing token reads its own page in fp16, so the backend commits
    the page after the layer's attention (on CUDA on a side stream; here in line, the same
    order of effects), while extend commits before attention, where later tokens of the same
    pass read the page packed."""
    from kvarn_sglang.serving import backend as backend_mod

    server = SimServer(CFG)
    tokens = [random.Random(3).randrange(64) for _ in range(3 * G + 4)]
    req = server.start(tokens)
    assert server.extend([req], [2 * G - 1])  # page 1 lacks its last token
    store, events, inside = server.pool.store, [], []
    commit_slots, commit = store.commit_slots, store.commit
    decode, extend = backend_mod.ref_decode_attention, backend_mod.ref_extend_attention

    def log(name, fn):
        def wrapped(*a, **kw):
            if name != "commit":
                events.append((name,))
            elif not inside and int((a[1] > 0).sum()):  # page 0 pads; commit_slots -> commit
                events.append((name, a[0], int((a[1] > 0).sum())))
            inside.append(name)
            try:
                return fn(*a, **kw)
            finally:
                inside.pop()

        return wrapped

    monkeypatch.setattr(store, "commit_slots", log("commit", commit_slots))
    monkeypatch.setattr(store, "commit", log("commit", commit))
    monkeypatch.setattr(backend_mod, "ref_decode_attention", log("decode", decode))
    monkeypatch.setattr(backend_mod, "ref_extend_attention", log("extend", extend))
    layers = len(server.layers)
    assert server.decode([req])  # completes page 1
    assert events == [e for layer in range(layers) for e in (("decode",), ("commit", layer, 1))]
    page1 = int(server.req_pool.req_to_token[req.row, G]) // G
    assert int(store.commits[page1]) == 1
    events.clear()
    assert server.extend([req], [G + 2])  # fills page 2; its last tokens read it packed
    assert events == [e for layer in range(layers) for e in (("commit", layer, 1), ("extend",))]
    _check_outputs(server, req)
