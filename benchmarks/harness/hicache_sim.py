"""A page-level model of a hierarchical prefix cache, for figures "on paper".

SGLang's fp16 host pool does not run on the CPU test bed, so ``bench_hicache`` computes what
an fp16 HiCache of the same host bytes would have cached for the same request trace with this
model, and checks the model on the KVarN run it measured. The model: with write-through every
cached page has a host copy, so the device and host tiers together hold what the host tier
holds; a request hits the longest prefix of its full pages that is cached (page by page from
the first, as SGLang's radix match does, never the whole prompt); after it, the full pages of
its prompt and output are cached, least recently used leaves (pages no other cached page
extends) evicted until they fit. Pages cost bytes: a KVarN sink page (sequence position
``< sink_pages``) ``sink_bytes``, every other KVarN page ``page_bytes``; an fp16 page its
fp16 bytes wherever it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PageCosts:
    """Host bytes of one page (all layers and KV heads)."""

    page_bytes: int
    sink_bytes: int
    sink_pages: int = 1

    def of(self, position: int) -> int:
        return self.sink_bytes if position < self.sink_pages else self.page_bytes


class PrefixCacheModel:
    """Cached pages keyed by their token prefix; LRU eviction of leaves within ``capacity``
    bytes (see the module docstring)."""

    def __init__(self, capacity: int, costs: PageCosts, page_size: int) -> None:
        self.capacity, self.costs, self.g = capacity, costs, page_size
        self.pages: dict[tuple, int] = {}  # page key -> last use
        self.children: dict[tuple, int] = {}  # page key -> cached pages extending it
        self.used = 0
        self.clock = 0

    def _keys(self, tokens: list[int]) -> list[tuple]:
        g = self.g
        return [tuple(tokens[: (j + 1) * g]) for j in range(len(tokens) // g)]

    def match(self, prompt: list[int]) -> int:
        """Tokens of ``prompt`` the cache serves (full pages, at most ``len - 1`` tokens)."""
        hit = 0
        for key in self._keys(prompt[: len(prompt) - 1]):
            if key not in self.pages:
                break
            hit += self.g
        return hit

    def insert(self, tokens: list[int]) -> None:
        """Cache the full pages of ``tokens`` (touching those already cached)."""
        self.clock += 1
        parent = None
        for j, key in enumerate(self._keys(tokens)):
            if key not in self.pages:
                cost = self.costs.of(j)
                if not self._make_room(cost, keep=key[: j * self.g] if j else None):
                    return
                self.used += cost
                self.children[key] = 0
                if parent is not None:
                    self.children[parent] += 1
            self.pages[key] = self.clock
            parent = key

    def _make_room(self, cost: int, keep) -> bool:
        while self.used + cost > self.capacity:
            leaves = [k for k, n in self.children.items() if n == 0 and k != keep]
            if not leaves:
                return False
            victim = min(leaves, key=self.pages.__getitem__)
            del self.pages[victim], self.children[victim]
            self.used -= self.costs.of(len(victim) // self.g - 1)
            if len(victim) > self.g:
                self.children[victim[: -self.g]] -= 1
        return True


def replay(trace: list[tuple[list[int], list[int]]], model: PrefixCacheModel) -> dict:
    """Serve ``trace`` (prompt, output) in order; cached and prompt tokens per request."""
    cached, prompt_tokens = [], []
    for prompt, output in trace:
        cached.append(model.match(prompt))
        prompt_tokens.append(len(prompt))
        model.insert(prompt + output)
    return {
        "prompt_tokens": sum(prompt_tokens),
        "cached_tokens": sum(cached),
        "cached_token_rate": sum(cached) / max(1, sum(prompt_tokens)),
        "per_request_cached": cached,
    }
