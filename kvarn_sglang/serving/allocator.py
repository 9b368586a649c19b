"""``KVarNPagedAllocator``: SGLang's paged allocator that also owns the fp16 slots of pages.

SGLang's allocator hands out pages and takes them back, but is never told which pages need
an fp16 slot, and the pool is never told when a page is freed. This subclass is where both
meet: it gives every new page that needs a slot its slot as it allocates it (the decision is
``pages.pass_pages``), takes the slot back when the page is freed, keeps slot-aware
admission and eviction by sink working, and answers SGLang's idle memory check for slots.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator

from kvarn_sglang.serving.pages import pass_pages, sink_page_range


class KVarNPagedAllocator(PagedTokenToKVPoolAllocator):
    """SGLang's paged allocator that also manages the pool's fp16 slots.

    * Admission is slot-aware: ``slot_budget`` and ``request_sinks`` give the hook on SGLang's
      ``PrefillAdder`` (``kvarn_sglang.patches.schedule_policy``) what the requests holding
      KV have committed and what a candidate would add (``kvarn_sglang.serving.slot_budget``), so a
      request is admitted only if its slots will exist, and otherwise waits.
    * Allocation gives every new page that needs a slot (a sink page, or one that stays
      partial after the pass) its slot, so a forward pass never has to find one.
    * When slots run short it evicts by sink (``kvarn_sglang.serving.sink_eviction``): the cached
      subtree under the least recently used unlocked sink page, in one step, through the tree
      cache that the scheduler hands to ``evict_to_free_tokens`` before every allocation.
      Pages that run short are SGLang's own LRU eviction, unchanged. If slots still cannot be
      had the allocation fails (``None``) and the decode capacity check says no, so SGLang
      makes requests wait or retracts them.
    * Every free (request teardown, radix eviction, duplicate pages found on insert) reaches
      ``_release_page_ids`` exactly once per page, which releases the page's slot.
    """

    _tree_cache = None
    hicache = None  # the KVarN HiCache controller (``hicache``), with --enable-hierarchical-cache
    idle_checks = 0  # how often SGLang's idle memory check ran ``verify_byte_accounting``
    sink_evictions = 0  # cached subtrees evicted to free a sink slot
    admissions_waited_for_slots = 0  # candidates the admission hook kept waiting

    def _store(self):
        return getattr(self.get_kvcache(), "store", None)

    def _sinks(self) -> torch.Tensor:
        """``bool [num_pages + 1]``: which allocated pages are sink pages (hold a sink slot)."""
        if getattr(self, "_sink_mask", None) is None:
            self._sink_mask = torch.zeros(self.num_pages + 1, dtype=torch.bool, device=self.device)
        return self._sink_mask

    def evict_to_free_tokens(self, tree_cache, num_tokens: int):
        self._tree_cache = tree_cache
        return super().evict_to_free_tokens(tree_cache, num_tokens)

    def check_decode_capacity(self, *, num_tokens: int, tree_cache, requests=None, **kwargs):
        fits = super().check_decode_capacity(
            num_tokens=num_tokens, tree_cache=tree_cache, requests=requests, **kwargs
        )
        return self.make_slot_room(tree_cache, -(-num_tokens // self.page_size)) and fits

    def make_slot_room(self, tree_cache, num_slots: int) -> bool:
        """Evict cached subtrees by sink, least recently used unlocked sink first, until
        ``num_slots`` fp16 slots are free; False if they cannot be."""
        from kvarn_sglang.serving.sink_eviction import evict_sink_subtree, evictable_sinks

        store = self._store()
        if store is None:
            return True
        store.flush_released()
        if store.free_slots >= num_slots or tree_cache is None:
            return store.free_slots >= num_slots
        g, sink = self.page_size, store.config.sink_pages
        sinks = self._sinks()
        for page in evictable_sinks(tree_cache, g, sink):  # least recently used first
            if store.free_slots >= num_slots:
                break
            if bool(sinks[page]) and evict_sink_subtree(tree_cache, page, g, sink):
                self.sink_evictions += 1
        return store.free_slots >= num_slots

    def slot_budget(self, tree_cache):
        """The slots committed to the requests holding KV now (``SlotBudget``): their
        distinct sink pages, read off SGLang's request rows, and a filling page each."""
        from kvarn_sglang.serving.slot_budget import SlotBudget

        store, pool = self._store(), getattr(tree_cache, "req_to_token_pool", None)
        if store is None or pool is None:
            return None
        store.flush_released()
        # Every row but the padding row 0 (a PD decode server has rows beyond ``pool.size``
        # for requests waiting for their KV).
        rows = sorted(set(range(1, pool.req_to_token.shape[0])) - set(pool.free_slots))
        g, sink = self.page_size, store.config.sink_pages
        live: set[int] = set()
        if rows and sink:
            pages = pool.req_to_token[rows, : sink * g : g].to(torch.int64).flatten() // g
            live = set(pages[self._sinks()[pages]].tolist())  # stale row entries drop out
        return SlotBudget(store.num_slots, live, len(rows))

    def request_sinks(self, tree_cache, req) -> tuple[list[int], int]:
        """A waiting request's sink pages: the page ids its matched prefix covers, and how
        many it would allocate."""
        store = self._store()
        total = len(req.full_untruncated_fill_ids)
        cached, new = sink_page_range(
            req.prefix_len, total, self.page_size, store.config.sink_pages
        )
        pages = []
        if len(cached):
            index = tree_cache.prefix_device_indices(req)[: len(cached) * self.page_size]
            pages = (index[:: self.page_size].to(torch.int64) // self.page_size).tolist()
        return pages, len(new)

    def _assign(
        self, out: torch.Tensor | None, rows: list[int], sink_rows: list[int]
    ) -> torch.Tensor | None:
        """Give the pages of ``out[rows]`` (allocated token slots) their fp16 slots; the pages
        of ``out[sink_rows]`` are sink pages."""
        store = self._store()
        if out is not None and rows and store is not None:
            index = torch.tensor(rows, dtype=torch.long).to(out.device, non_blocking=True)
            store.assign_slots(out[index] // self.page_size)
        if out is not None and sink_rows and store is not None:
            pages = out[torch.tensor(sink_rows, dtype=torch.long).to(out.device)] // self.page_size
            self._sinks()[pages] = True
        return out

    def _slot_rows(self, prefix_lens: list[int], seq_lens: list[int]):
        """Rows of the pass's new tokens starting a page that needs a slot, and those of them
        starting a sink page (``pages.pass_pages``)."""
        pages = pass_pages(prefix_lens, seq_lens, self.page_size, self._store().config.sink_pages)
        return pages.new_slot_rows, pages.new_sink_rows

    def alloc(self, need_size: int):
        """Whole pages outside the extend/decode paths: each gets an fp16 slot, as any of
        them may be written partially."""
        store = self._store()
        pages = -(-need_size // self.page_size)
        if store is not None and not self.make_slot_room(self._tree_cache, pages):
            return None
        out = super().alloc(need_size)
        return self._assign(out, list(range(0, need_size, self.page_size)), [])

    def alloc_loaded(self, need_size: int, sink_offsets: list[int]) -> torch.Tensor | None:
        """Pages for ``need_size`` tokens loaded back from the host tier (HiCache): they are
        complete, so only the pages at ``sink_offsets`` (page positions within the
        allocation) take an fp16 slot, and they are sink pages; None if pages or slots are
        short."""
        store = self._store()
        if store is not None and not self.make_slot_room(self._tree_cache, len(sink_offsets)):
            return None
        out = PagedTokenToKVPoolAllocator.alloc(self, need_size)
        rows = [j * self.page_size for j in sink_offsets]
        return self._assign(out, rows, rows)

    def alloc_extend(
        self, prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens,
        *args, **kwargs,
    ):  # fmt: skip
        rows = sink_rows = []
        if self._store() is not None:
            rows, sink_rows = self._slot_rows(prefix_lens_cpu.tolist(), seq_lens_cpu.tolist())
            if not self.make_slot_room(self._tree_cache, len(rows)):
                return None
        out = super().alloc_extend(
            prefix_lens, prefix_lens_cpu, seq_lens, seq_lens_cpu, last_loc, extend_num_tokens,
            *args, **kwargs,
        )  # fmt: skip
        return self._assign(out, rows, sink_rows)

    def alloc_decode(self, seq_lens, seq_lens_cpu, last_loc, *args, **kwargs):
        rows = sink_rows = []
        if self._store() is not None:
            seq = seq_lens_cpu.tolist()
            rows, sink_rows = self._slot_rows([s - 1 for s in seq], seq)
            if not self.make_slot_room(self._tree_cache, len(rows)):
                return None
        out = super().alloc_decode(seq_lens, seq_lens_cpu, last_loc, *args, **kwargs)
        return self._assign(out, rows, sink_rows)

    def _release_page_ids(self, *page_ids: torch.Tensor) -> None:
        super()._release_page_ids(*page_ids)
        store = self._store()
        if store is not None and page_ids:
            pages = torch.cat([p.reshape(-1) for p in page_ids])
            store.forget_pages(pages)
            self._sinks()[pages] = False

    def verify_byte_accounting(self) -> list[str]:
        """SGLang's idle-time check: every fp16 slot is either free or held by an allocated
        page that is not committed (a filling page or a sink page); violations are leaks."""
        violations = list(super().verify_byte_accounting())
        self.idle_checks += 1
        store = self._store()
        if store is None:
            return violations
        store.flush_released()
        held = store.page_slot != store.scratch
        free_pages = self.get_all_free_pages()
        stack = store.free_slot_ids()
        checks = {
            "free pages still hold fp16 slots": int(held[free_pages].sum()),
            "committed pages still hold fp16 slots": int((held & (store.commits > 0)).sum()),
            "slots neither free nor held": store.num_slots - int(held.sum()) - len(stack),
            "slots both free and held (or free twice)": len(stack)
            - int(torch.unique(stack).numel())
            + int(torch.isin(store.page_slot[held], stack).sum()),
            "sink pages without an fp16 slot": int((self._sinks() & ~held).sum()),
        }
        violations += [f"kvarn: {n} {what}" for what, n in checks.items() if n]
        if self.hicache is not None and not self.hicache.has_inflight_device_transfers():
            violations += self.hicache.host_pool.verify()
        return violations

    def kvarn_state(self) -> dict:
        """What the scheduler reports about the KVarN pool (``/get_server_info``)."""
        store, pool = self._store(), self.get_kvcache()
        store.flush_released()
        cfg = store.config
        return {
            "preset": cfg.name,
            "sink_pages": cfg.sink_pages,
            "page_size": self.page_size,
            "slots_total": store.num_slots,
            "slots_free": store.free_slots,
            "pages_total": self.size // self.page_size,
            "pages_free": self.available_size() // self.page_size,
            "token_capacity": self.size,
            "pool_bytes": store.nbytes,
            "slot_bytes": store.slot_nbytes,
            "layers": pool.layer_num,
            "idle_checks": self.idle_checks,
            "sink_evictions": self.sink_evictions,
            "admissions_waited_for_slots": self.admissions_waited_for_slots,
            **({"hicache": self.hicache.state()} if self.hicache is not None else {}),
        }

    def clear(self) -> None:
        super().clear()
        self._sinks().zero_()
        store = self._store()
        if store is not None:
            store.reset()
