"""The page-level prefix-cache model behind ``bench_hicache``'s fp16 figures on paper."""

from __future__ import annotations

from benchmarks.harness.hicache_sim import PageCosts, PrefixCacheModel, replay

G = 4


def _session(sid: int, pages: int) -> list[int]:
    return [sid * 1000 + t for t in range(pages * G)]


def test_hits_are_whole_pages_of_the_prefix_and_never_the_whole_prompt():
    model = PrefixCacheModel(10**6, PageCosts(1, 1), G)
    prompt = _session(0, 3)
    model.insert(prompt)
    assert model.match(prompt) == 2 * G  # the last token is always computed
    assert model.match([*prompt, 7]) == 3 * G
    assert model.match([9, *prompt]) == 0


def test_least_recently_used_leaves_go_first_and_sink_pages_cost_more():
    costs = PageCosts(page_bytes=1, sink_bytes=5)
    model = PrefixCacheModel(capacity=14, costs=costs, page_size=G)
    a, b, c = _session(1, 2), _session(2, 2), _session(3, 2)
    model.insert(a)  # 5 + 1
    model.insert(b)  # 5 + 1 = 12 in all
    assert model.used == 12
    model.insert(c)  # needs 6: a's leaf then a's sink (least recently used) go
    assert model.match([*a, 0]) == 0
    assert model.match([*b, 0]) == 2 * G and model.match([*c, 0]) == 2 * G
    assert model.used == 12


def test_replay_counts_what_a_smaller_cache_loses():
    trace = [(_session(s, 3), [1]) for s in range(4)] * 2
    big = replay(trace, PrefixCacheModel(100, PageCosts(1, 1), G))
    small = replay(trace, PrefixCacheModel(6, PageCosts(1, 1), G))
    assert big["cached_tokens"] == 4 * 2 * G  # every second visit hits 2 pages
    assert small["cached_tokens"] == 0  # LRU over a cyclic trace larger than the cache
    assert big["prompt_tokens"] == small["prompt_tokens"] == 8 * 3 * G


if __name__ == "__main__":
    test_least_recently_used_leaves_go_first_and_sink_pages_cost_more()
