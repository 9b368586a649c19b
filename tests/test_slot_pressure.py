"""fp16 slot pressure handled the way SGLang handles its own pool: cached sink pages give
their slots back through eviction by sink (the least recently used unlocked subtree under a
distinct first page, in one step, with SGLang's ``RadixCache`` and ``UnifiedRadixCache``, the
latter on its native and its Python tree core); when running requests hold every slot,
allocation fails cleanly (SGLang waits) and the decode check says no (SGLang retracts).
Nothing cached or running is touched by a failed allocation."""

from __future__ import annotations

from array import array

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang_harness import SimServer

from kvarn_sglang.format.config import KVarNConfig

G = 64
CFG = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=1)


def _cached_tokens(server: SimServer, tokens: list[int]) -> int:
    key = RadixKey(array("q", tokens))
    return server.tree.match_prefix(MatchPrefixParams(key=key)).device_prefix_len


def _serve(server: SimServer, tokens: list[int]):
    req = server.start(tokens)
    assert server.extend([req], [len(tokens) - req.cached_len])
    return req


TREES = ["radix", "unified", "unified-python"]


@pytest.mark.parametrize("tree", TREES)
def test_cached_sink_slots_are_reclaimed_by_evicting_the_least_recently_used_prefix(tree):
    server = SimServer(CFG, num_pages=40, num_slots=4, tree=tree)
    prompts = [[p] * (2 * G) for p in range(4)]  # whole pages: only the sink holds a slot
    for tokens in prompts:
        server.finish(_serve(server, tokens))
    store = server.pool.store
    assert store.free_slots == 0  # four cached prefixes, each holding its fp16 sink page
    _cached_tokens(server, prompts[0])  # touch prompt 0: prompt 1 is now the oldest
    fresh = _serve(server, [9] * (G + 3))  # needs a sink slot and a tail slot
    for layer in range(len(server.layers)):
        want = server.expected(fresh.tokens, layer)
        for pos, outs in fresh.outputs.items():
            torch.testing.assert_close(outs[layer], want[pos], atol=2e-3, rtol=2e-3)
    assert _cached_tokens(server, prompts[1]) == 0, "the least recently used prefixes go first"
    assert _cached_tokens(server, prompts[2]) == 0
    assert _cached_tokens(server, prompts[0]) == 2 * G
    assert _cached_tokens(server, prompts[3]) == 2 * G


@pytest.mark.parametrize("tree", TREES)
def test_eviction_by_sink_frees_a_slot_in_one_step(tree):
    """Slots are short and pages are not: SGLang's leaf-by-leaf LRU eviction drops old
    leaves under a sink that a running request holds (no slot comes back), while eviction by
    sink drops the one unlocked subtree, all of it, and frees its slot at once."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    from kvarn_sglang.serving.sink_eviction import evictable_sinks

    server = SimServer(CFG, num_pages=40, num_slots=3, tree=tree)
    held = [[1] * G + [10 + i] * G for i in range(3)]  # one sink, three branches (oldest)
    unlocked = [[2] * G + [20 + i] * G for i in range(2)]  # another sink, two branches
    for tokens in held + unlocked:
        server.finish(_serve(server, tokens))
    running = _serve(server, [1] * G + [30] * 5)  # shares the first sink: it is locked now
    store, alloc = server.pool.store, server.alloc
    assert store.free_slots == 0  # two cached sinks + the running request's filling page
    sinks = evictable_sinks(server.tree, G, 1)
    assert len(sinks) == 1  # only the second sink: the first is locked by the running request

    server.tree.evict(EvictParams(num_tokens=G))  # SGLang's LRU: the oldest leaf, one page
    assert store.free_slots == 0 and _cached_tokens(server, held[0]) == G

    cached_before = server.tree.evictable_size()
    assert alloc.make_slot_room(server.tree, 1) and alloc.sink_evictions == 1
    assert store.free_slots == 1
    assert cached_before - server.tree.evictable_size() == 3 * G  # the subtree, nothing more
    assert all(_cached_tokens(server, t) == 0 for t in unlocked)
    assert [_cached_tokens(server, t) for t in held[1:]] == [2 * G, 2 * G]
    assert not store.held_mask()[sinks[0]]
    server.finish(running)


def test_sglang_allocation_functions_make_room_for_slots():
    from sglang.srt.mem_cache.allocation import (
        alloc_paged_token_slots_decode,
        alloc_paged_token_slots_extend,
    )

    server = SimServer(CFG, num_pages=40, num_slots=2, tree="unified")
    for p in range(2):
        server.finish(_serve(server, [p] * (2 * G)))  # two cached sinks hold both slots
    assert server.pool.store.free_slots == 0
    t = torch.tensor
    loc = alloc_paged_token_slots_extend(
        server.tree, t([0]), t([0]), t([G + 1]), t([G + 1]), t([-1]), G + 1
    )  # needs a sink slot and a tail slot: both cached prefixes are evicted for them
    assert loc is not None and server.pool.store.free_slots == 0
    assert server.pool.store.held_mask()[loc[[0, G]] // G].all()
    loc2 = alloc_paged_token_slots_decode(server.tree, t([G + 2]), t([G + 2]), loc[-1:])
    assert loc2.tolist() == [int(loc[-1]) + 1]  # same page: no new slot needed
    server.alloc.free(torch.cat([loc, loc2]))
    assert server.pool.store.free_slots == 2


def test_allocation_fails_cleanly_when_running_requests_hold_every_slot():
    server = SimServer(CFG, num_pages=40, num_slots=4)
    running = [_serve(server, [p] * (G + 5)) for p in range(2)]  # 2 slots each
    store, alloc = server.pool.store, server.alloc
    before = (store.free_slots, alloc.available_size(), store.page_slot.clone())
    late = server.start([7] * 10)
    assert not server.extend([late], [10])  # out of memory: SGLang keeps it waiting
    assert (store.free_slots, alloc.available_size()) == before[:2]
    assert torch.equal(store.page_slot, before[2])
    server.abort(late)
    for r in running:  # the running requests are intact
        for layer in range(len(server.layers)):
            want = server.expected(r.tokens, layer)
            for pos, outs in r.outputs.items():
                torch.testing.assert_close(outs[layer], want[pos], atol=2e-3, rtol=2e-3)


def test_decode_capacity_check_counts_fp16_slots():
    server = SimServer(CFG, num_pages=40, num_slots=4)
    a = _serve(server, [1] * (2 * G))  # full pages only: holds its sink slot
    b = _serve(server, [2] * (G + 5))  # sink + tail
    alloc = server.alloc
    assert server.pool.store.free_slots == 1
    assert alloc.check_decode_capacity(num_tokens=G, tree_cache=server.tree)  # a new page
    assert not alloc.check_decode_capacity(num_tokens=2 * G, tree_cache=server.tree)
    a.tokens.append(3)
    assert server.decode([a])  # a's next token starts a page and takes the free slot
    b.tokens.append(4)
    assert server.decode([b])  # b's tail page has its slot already
    assert server.pool.store.free_slots == 0


def test_assign_slots_rejects_more_pages_than_free_slots():
    server = SimServer(CFG, num_pages=40, num_slots=3)
    req = server.start([5] * (3 * G + 1))
    assert server.extend([req], [3 * G + 1])  # sink + tail slots, two pages direct
    assert server.pool.store.free_slots == 1
    store = server.pool.store
    with pytest.raises(Exception, match="fp16 slot"):
        store.assign_slots(torch.tensor([30, 31]))


if __name__ == "__main__":
    test_cached_sink_slots_are_reclaimed_by_evicting_the_least_recently_used_prefix("unified")
