"""A scheduler-shaped driver of SGLang's real radix cache, allocators and request pool, with
every KV pool the prefix-sharing benchmark compares, sized by bytes for a model shape.

What is SGLang's own code here: ``ReqToTokenPool``, ``RadixCache`` (page-aligned match and
insert, LRU eviction, lock refs), ``PagedTokenToKVPoolAllocator`` / ``TokenToKVPoolAllocator``
and the allocation entry points the scheduler calls (``alloc_paged_token_slots_extend`` /
``_decode``, ``alloc_token_slots``: they evict from the tree through
``allocator.evict_to_free_tokens`` and then allocate), and the decode gate
``allocator.check_decode_capacity`` (False: retract a request). With KVarN the pool,
allocator and attention backend are ours (``KVarNTokenToKVPool``, ``KVarNPagedAllocator``,
``KVarNAttnBackend``), run for real with one layer and one KV head of head_dim 128 but with
the page and slot counts the full model shape's byte budget gives; each pass stores random
fp16 K/V through ``backend.write_kv`` (store, commit completed pages, release slots) without
computing attention. Dense pools (fp16, fp8, int8) store no K/V: their allocators get a
bytes-only stand-in for the KV cache object, which they keep only for bookkeeping.

What mirrors SGLang's scheduler, simplified (``Server``):

* admission (``PrefillAdder`` with the default FCFS policy): in queue order, match the prompt
  (minus its last token) in the tree and lock the match; admit while ``extend + max_new +
  page_size < available_size + evictable_size - reserved`` (reserved = the remaining
  generation of running requests, new-token ratio 1.0 since lengths are fixed, like
  ``ignore_eos``, plus what this pass already admitted), up to ``max_running`` requests and
  ``max_prefill_tokens`` new tokens per pass (the first request is always admitted); stop at
  the first request that does not fit. No chunked prefill: a long prompt is one pass.
* a prefill pass runs whenever something was admitted, else one decode step of all running
  requests; requests are inserted into the tree when they finish (``cache_finished_req``:
  page-aligned, duplicate pages freed, the partial tail freed).
* retraction (``retract_decode``): while ``check_decode_capacity`` fails, release the request
  with the fewest generated tokens (then the longest prompt) without caching it and put it
  back at the head of the queue.

Cache accounting: ``hit`` = matched prefix tokens; ``reprefilled`` = prompt tokens that an
unbounded radix cache at the same page size, fed with everything this server computed, would
have matched but this server's tree no longer held (evicted; for int8, whose radix cache is
disabled, never kept).

What it stands in for: a Llama-3-8B-shaped memory system with a 40 GB KV budget and hundreds
of running branches, which no real server reaches on a CPU. The real engine (stock SGLang's
CPU server, ``benchmarks/bench_server.py`` and ``tests/test_server.py``) runs the same
workloads end to end at SmolLM2 scale and proves the request lifecycle; this driver measures
capacity at the scale where it matters.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.allocation import (
    alloc_paged_token_slots_decode,
    alloc_paged_token_slots_extend,
    alloc_token_slots,
)
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from benchmarks.pools import PoolSpec
from benchmarks.workloads import Spec, Workload


class _CountingRadixCache(RadixCache):
    """SGLang's ``RadixCache`` that counts the tokens it evicts."""

    evicted = 0

    def pretty_print(self) -> None:  # SGLang prints the tree on a failed allocation
        pass

    def evict(self, params):
        result = super().evict(params)
        self.evicted += result.num_tokens_evicted
        return result


class _Mode:
    def __init__(self, decode: bool) -> None:
        self.decode = decode

    def is_decode(self) -> bool:
        return self.decode


@dataclass(eq=False)
class Req:
    spec: Spec
    tokens: array  # prompt + generated ids
    prompt_len: int
    row: int = -1
    node: object = None
    prefix: int = 0  # tokens matched in the tree (owned by the tree)
    kv_len: int = 0
    out_len: int = 0

    @property
    def gen_len(self) -> int:
        return self.spec.gen_len


def _req(spec: Spec) -> Req:
    prompt = spec.prompt()
    return Req(spec, prompt + spec.output, len(prompt))


class Server:
    """SGLang's memory classes for one pool, and the scheduler loop of the module docstring."""

    def __init__(
        self,
        pool: PoolSpec,
        *,
        max_running: int,
        max_context: int,
        max_prefill_tokens: int = 16384,
    ) -> None:
        self.spec, self.ps = pool, pool.page_size
        self.max_running, self.max_prefill = max_running, max_prefill_tokens
        self.req_pool = ReqToTokenPool(
            size=max_running, max_context_len=max_context, device="cpu", enable_memory_saver=False
        )
        cap, dt = pool.token_capacity, torch.float16
        self.backend = self.kv = None
        if pool.config is not None:
            from kvarn_sglang.backend import KVarNAttnBackend
            from kvarn_sglang.pool import KVarNPagedAllocator, KVarNTokenToKVPool

            cfg = pool.config
            self.kv = KVarNTokenToKVPool(
                cap, self.ps, dt, 1, cfg.head_dim, 1, "cpu", False,
                start_layer=0, end_layer=1, kvarn_config=cfg, num_slots=pool.num_slots,
            )  # fmt: skip
            self.alloc = KVarNPagedAllocator(cap, self.ps, dt, "cpu", self.kv, need_sort=False)
            runner = SimpleNamespace(token_to_kv_pool=self.kv, req_to_token_pool=self.req_pool)
            self.backend = KVarNAttnBackend(runner)
            self.layer = SimpleNamespace(
                layer_id=0, tp_q_head_num=1, tp_k_head_num=1, qk_head_dim=cfg.head_dim,
                scaling=cfg.head_dim**-0.5,
            )  # fmt: skip
            gen = torch.Generator().manual_seed(0)
            n = max(max_context, max_prefill_tokens) + max_running + 1
            self.kv_values = torch.randn(n, 1, cfg.head_dim, generator=gen).half()
        elif self.ps == 1:
            self.alloc = TokenToKVPoolAllocator(cap, dt, "cpu", pool, need_sort=False)
        else:
            self.alloc = PagedTokenToKVPoolAllocator(cap, self.ps, dt, "cpu", pool, need_sort=False)
        self.tree = _CountingRadixCache(
            CacheInitParams(
                disable=not pool.radix, req_to_token_pool=self.req_pool,
                token_to_kv_pool_allocator=self.alloc, page_size=self.ps,
            )
        )  # fmt: skip
        self.shadow = RadixCache(
            CacheInitParams(
                disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=None,
                page_size=self.ps,
            )
        )  # fmt: skip
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.reset_stats()

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        self.tree.evicted = 0
        self.stats = dict.fromkeys(
            (
                "requests", "prompt_tokens", "hit_tokens", "reprefilled_tokens",
                "prefill_tokens", "prefill_passes", "decode_steps", "decode_batch_sum",
                "retractions", "retracted_tokens", "peak_running_branches",
                "duplicate_pages_freed", "prefill_alloc_failures", "pages_quantized",
                "pages_completed", "slot_peak",
            ),
            0,
        )  # fmt: skip
        self.stats["bytes_at_peak"] = 0
        self.stats["tokens_at_peak"] = 0

    def _note_running(self) -> None:
        branches = sum(r.gen_len > 0 for r in self.running)
        if branches > self.stats["peak_running_branches"]:
            self.stats["peak_running_branches"] = branches
            used_pages = (self.spec.token_capacity - self.alloc.available_size()) // self.ps
            used = used_pages * self.ps * self.spec.cell_bytes
            if self.kv is not None:
                store = self.kv.store
                used += (store.num_slots - store.free_slots) * self.spec.slot_bytes
            stored = self.tree.total_size() if self.spec.radix else 0
            stored += sum(r.kv_len - r.prefix for r in self.running)
            self.stats["bytes_at_peak"] = used
            self.stats["tokens_at_peak"] = stored

    # ------------------------------------------------------------------ scheduler
    def run(self, workload: Workload) -> dict:
        """Serve the warm-up specs, reset the counters, serve the workload; the counters."""
        self._serve(workload.warmup)
        self.reset_stats()
        self._serve(workload.roots)
        return self.stats | {"evicted_tokens": self.tree.evicted}

    def _serve(self, roots: list[Spec]) -> None:
        self.waiting.extend(_req(s) for s in roots)
        while self.waiting or self.running:
            batch = self._admit()
            if batch and not self._extend(batch):
                batch = []
            if batch:
                for r in batch:
                    if r.out_len >= r.gen_len:
                        self._finish(r)
                    else:
                        self.running.append(r)
            elif self.running:
                self._decode()
            else:
                head = self.waiting[0]
                raise RuntimeError(
                    f"request of {head.prompt_len} prompt tokens + {head.gen_len} does not fit "
                    f"in {self.spec.name}'s {self.spec.token_capacity} tokens"
                )
            self._note_running()

    def _admit(self) -> list[Req]:
        if not self.waiting or len(self.running) >= self.max_running:
            return []
        reserved = sum(r.gen_len - r.out_len for r in self.running)
        budget, batch = self.max_prefill, []
        while self.waiting and len(self.running) + len(batch) < self.max_running:
            r = self.waiting[0]
            key = RadixKey(r.tokens[: r.prompt_len - 1])
            m = self.tree.match_prefix(MatchPrefixParams(key=key))
            prefix = m.device_prefix_len
            extend = r.prompt_len - prefix
            self.tree.inc_lock_ref(m.last_device_node)
            need = extend + r.gen_len + self.ps
            room = self.alloc.available_size() + self.tree.evictable_size() - reserved
            if need >= room or (batch and extend > budget):
                self.tree.dec_lock_ref(m.last_device_node)
                break
            self.waiting.popleft()
            r.node, r.prefix = m.last_device_node, prefix
            reserved += need
            budget -= extend
            batch.append(r)
        return batch

    def _extend(self, batch: list[Req]) -> bool:
        """One prefill pass; False (and the batch back at the head of the queue) when the
        allocator refuses (KVarN: not enough fp16 slots even after eviction)."""
        rows = self.req_pool.alloc_rows(len(batch))
        table = self.req_pool.req_to_token
        last = []
        for r, row in zip(batch, rows, strict=True):
            r.row = row
            if r.prefix:
                idx = self.tree.path_device_indices(r.node)[: r.prefix]
                table[row, : r.prefix] = idx.to(torch.int32)
            last.append(int(table[row, r.prefix - 1]) if r.prefix else -1)
        pre = torch.tensor([r.prefix for r in batch])
        seq = torch.tensor([r.prompt_len for r in batch])
        total = int((seq - pre).sum())
        try:
            if self.ps == 1:
                loc = alloc_token_slots(self.tree, total)
            else:
                loc = alloc_paged_token_slots_extend(
                    self.tree, pre, pre, seq, seq, torch.tensor(last), total
                )
        except RuntimeError:  # SGLang's "Prefill out of memory"
            for r in reversed(batch):
                self._free_row(r)
                self.waiting.appendleft(r)
            self.stats["prefill_alloc_failures"] += 1
            return False
        s = self.stats
        for r in batch:
            key = RadixKey(r.tokens[: r.prompt_len - 1])
            known = self.shadow.match_prefix(MatchPrefixParams(key=key)).device_prefix_len
            s["requests"] += 1
            s["prompt_tokens"] += r.prompt_len
            s["hit_tokens"] += r.prefix
            s["reprefilled_tokens"] += max(0, known - r.prefix)
        start = 0
        for r in batch:
            n = r.prompt_len - r.prefix
            table[r.row, r.prefix : r.prompt_len] = loc[start : start + n].to(torch.int32)
            start += n
        self._write_kv(batch, pre.tolist(), seq.tolist(), loc, decode=False)
        for r in batch:
            r.kv_len, r.out_len = r.prompt_len, min(1, r.gen_len)
        self.stats["prefill_passes"] += 1
        self.stats["prefill_tokens"] += total
        return True

    def _decode(self) -> None:
        order = sorted(self.running, key=lambda r: (r.out_len, -r.prompt_len), reverse=True)
        while len(order) > 1:
            need = sum(r.kv_len % self.ps == 0 for r in order) * self.ps
            if self.alloc.check_decode_capacity(num_tokens=need, tree_cache=self.tree):
                break
            self._retract(order.pop())
        self.running = order
        table = self.req_pool.req_to_token
        rows = torch.tensor([r.row for r in order])
        cur = torch.tensor([r.kv_len for r in order])
        if self.ps == 1:
            loc = alloc_token_slots(self.tree, len(order))
        else:
            last = table[rows, cur - 1].long()
            loc = alloc_paged_token_slots_decode(self.tree, cur + 1, cur + 1, last)
        table[rows, cur] = loc.to(torch.int32)
        self._write_kv(order, cur.tolist(), (cur + 1).tolist(), loc, decode=True)
        for r in order:
            r.kv_len += 1
            r.out_len += 1
        self.stats["decode_steps"] += 1
        self.stats["decode_batch_sum"] += len(order)
        self.running = [r for r in order if r.out_len < r.gen_len]
        for r in order:
            if r.out_len >= r.gen_len:
                self._finish(r)

    def _write_kv(self, batch, pre: list[int], seq: list[int], loc, *, decode: bool) -> None:
        if self.backend is None:
            return
        g, sink = self.ps, self.spec.config.sink_pages
        for p, s in zip(pre, seq, strict=True):  # pages this pass completes, past the sinks
            self.stats["pages_completed"] += max(0, s // g - max(p // g, sink))
        fb = SimpleNamespace(
            forward_mode=_Mode(decode), seq_lens_cpu=torch.tensor(seq), extend_prefix_lens_cpu=pre,
            req_pool_indices=torch.tensor([r.row for r in batch]), out_cache_loc=loc,
        )  # fmt: skip
        store = self.kv.store
        self.backend.init_forward_metadata(fb)
        self.stats["slot_peak"] = max(self.stats["slot_peak"], store.num_slots - store.free_slots)
        before = int(store.commits.sum())
        kv = self.kv_values[: len(loc) + 1]
        self.backend.write_kv(kv[:-1], kv[1:], self.layer, fb)
        self.stats["pages_quantized"] += int(store.commits.sum()) - before
        assert int(store.commits.max()) <= 1, "a page was quantized twice"

    def _free_row(self, r: Req) -> None:
        self.tree.dec_lock_ref(r.node)
        self.req_pool.free_rows([r.row])
        r.row, r.node = -1, None

    def _retract(self, r: Req) -> None:
        idx = self.req_pool.req_to_token[r.row, r.prefix : r.kv_len].long()
        self.alloc.free(idx)
        self._free_row(r)
        self.stats["retractions"] += 1
        self.stats["retracted_tokens"] += r.kv_len - r.prefix
        r.prefix = r.kv_len = r.out_len = 0
        self.waiting.appendleft(r)

    def _finish(self, r: Req) -> None:
        idx = self.req_pool.req_to_token[r.row, : r.kv_len].long().clone()
        aligned = r.kv_len // self.ps * self.ps
        key = RadixKey(r.tokens[:aligned])
        if self.spec.radix:
            res = self.tree.insert(InsertParams(key=key, value=idx[:aligned].clone()))
            if res.prefix_len > r.prefix:  # pages the tree already had: ours are duplicates
                self.alloc.free(idx[r.prefix : res.prefix_len])
                self.stats["duplicate_pages_freed"] += (res.prefix_len - r.prefix) // self.ps
            if r.kv_len > aligned:
                self.alloc.free(idx[aligned:])
        else:
            self.alloc.free(idx)
        self.shadow.insert(InsertParams(key=key, value=None))
        self._free_row(r)
        self.waiting.extend(_req(c) for c in r.spec.children)


def check_no_leak(server: Server) -> None:
    """After a run: every page is free or in the tree; with KVarN, tree pages past the sink
    were quantized exactly once and only sink pages of cached prefixes hold fp16 slots.
    Then evicting the whole tree returns every page and every slot. Raises AssertionError."""
    assert not server.running and not server.waiting, "requests left"
    tree, alloc, ps = server.tree, server.alloc, server.ps
    cap = server.spec.token_capacity
    in_tree = tree.total_size() if server.spec.radix else 0
    assert alloc.available_size() + in_tree == cap, "pages leaked"
    assert server.req_pool.available_size() == server.max_running, "request rows leaked"
    if server.kv is not None:
        store = server.kv.store
        pages = (tree.all_values_flatten().long() // ps).unique() if in_tree else None
        sinks = {int(c.value[0]) // ps for c in tree.root_node.children.values()}
        if pages is not None:
            rest = torch.tensor(sorted(set(pages.tolist()) - sinks), dtype=torch.long)
            assert bool((store.commits[rest] == 1).all()), "a tree page not quantized once"
        held = set(store.held_mask().nonzero().flatten().tolist())
        assert held == sinks, f"slots held by {sorted(held - sinks)} besides sinks"
    tree.evict(EvictParams(num_tokens=cap))
    assert alloc.available_size() == cap, "pages leaked after evicting the tree"
    if server.kv is not None:
        assert server.kv.store.free_slots == server.kv.store.num_slots, "fp16 slots leaked"
