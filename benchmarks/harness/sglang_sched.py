"""SGLang's scheduler, driven without a model: the prefix-sharing benchmark's server.

What runs is SGLang 0.5.23's own code, in one process (``benchmarks.harness.sched_context``
publishes the scheduler configuration): ``Req``, ``SchedulePolicy.calc_priority``,
``PrefillAdder`` (``add_chunked_req``, ``add_one_req``; with KVarN, through the plugin's
slot-aware hook), ``ScheduleBatch`` (``init_new``, ``prepare_for_extend`` and
``prepare_for_decode``, which allocate through ``alloc_for_extend``/``alloc_for_decode``,
evicting from the tree), ``check_decode_mem`` and ``retract_decode`` (``release_req``),
``merge_batch`` and ``filter_batch``, ``checkpoint_kv_cache`` and ``release_kv_cache`` (the
radix tree's request lifecycle), ``NewTokenRatioTracker`` and the scheduler's default tree,
``UnifiedRadixCache`` (native tree core), over SGLang's ``ReqToTokenPool`` and paged or token
allocator. With KVarN the pool, allocator and attention backend are the plugin's (one layer and
KV head, the page and slot counts of the full model shape's byte budget; each pass stores random
K/V through ``KVarNAttnBackend.write_kv``: slots, commits, releases; no attention is computed).
Dense pools store nothing (a bytes-only stand-in KV cache).

``SchedServer.step`` mirrors ``Scheduler.get_next_batch_to_run`` with overlap scheduling off
(KVarN turns it off): merge the last prefill batch into the running batch (the chunked
request stays out and is checkpointed into the tree), try a prefill batch
(``_get_new_batch_prefill_raw``: row budget, policy, adder loop, ``NO_TOKEN`` marks the batch
full), else ``update_running_batch`` (check, retract, decay the new-token ratio) and a decode
step. With ``mixed_chunk`` (``--enable-mixed-chunk``) the adder's chunk budget is lowered by the
running requests and their decode step rides in the prefill batch (``mix_with_running``).
Results are processed as ``process_batch_result_prefill/decode`` do. The "model" emits the
workload's predetermined tokens and a stop token at each request's own output length;
``max_new_tokens`` is larger, so SGLang's admission sees variable, unknown output lengths, as
with real clients. What it leaves out: streaming, logprobs, grammar, the tokenizer and
detokenizer processes, and time (a step is one forward pass).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks.harness.pools import PoolSpec
from benchmarks.harness.workloads import Spec


class _Mode:
    def __init__(self, decode: bool) -> None:
        self.decode = decode

    def is_decode(self) -> bool:
        return self.decode


def _counting_tree(params):
    """SGLang's ``UnifiedRadixCache`` that counts the tokens it evicts (every device-leaf
    eviction, SGLang's and KVarN's by sink, goes through ``_evict_device_leaf``)."""
    from sglang.srt.mem_cache.unified_cache.components import ComponentType
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    class CountingTree(UnifiedRadixCache):
        evicted = 0

        def pretty_print(self) -> None:  # SGLang prints the tree on a failed allocation
            pass

        def _evict_device_leaf(self, node_id, tracker):
            before = tracker[ComponentType.FULL]
            result = super()._evict_device_leaf(node_id, tracker)
            self.evicted += tracker[ComponentType.FULL] - before
            return result

    params.tree_components = (ComponentType.FULL,)
    return CountingTree(params)


class SchedServer:
    """SGLang's scheduling classes over one pool (see the module docstring)."""

    def __init__(
        self, pool: PoolSpec, model_config, *, max_running: int, max_context: int,
        max_prefill_tokens: int = 16384, chunked_prefill_size: int | None = 8192,
        max_new_tokens: int = 256, mixed_chunk: bool = False,
    ) -> None:  # fmt: skip
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.managers.schedule_policy import SchedulePolicy
        from sglang.srt.managers.scheduler_components.new_token_ratio_tracker import (
            NewTokenRatioTracker,
        )
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
        from sglang.srt.mem_cache.radix_cache import RadixCache

        self.spec, self.ps, self.model_config = pool, pool.page_size, model_config
        self.max_running, self.max_prefill = max_running, max_prefill_tokens
        self.chunk, self.max_new = chunked_prefill_size, max_new_tokens
        self.mixed_chunk = mixed_chunk and chunked_prefill_size is not None
        self.req_pool = ReqToTokenPool(max_running, max_context, "cpu", False)
        self.alloc, self.kv, self.backend = self._allocator(pool, max_context)
        self.tree = _counting_tree(
            CacheInitParams(disable=not pool.radix, req_to_token_pool=self.req_pool,
                            token_to_kv_pool_allocator=self.alloc, page_size=self.ps)
        )  # fmt: skip
        self.shadow = RadixCache.create_simulated(page_size=self.ps)  # unbounded, keys only
        self.policy = SchedulePolicy("fcfs", self.tree, False, False, False)
        self.ratio = NewTokenRatioTracker.from_config()
        self.running = ScheduleBatch(reqs=[], batch_is_full=False)
        self.waiting, self.chunked, self.last_batch = [], None, None
        self.pending = None  # the pass ``forward`` ran, until ``process`` handles its results
        self._pending_chunked_abort_req = None
        self.tp_size, self.tp_cpu_group = 1, None  # a tensor-parallel rank sets both
        self.specs: dict[str, Spec] = {}
        self.ready: dict[str, int] = {}
        self.counted: set[str] = set()
        self.step_no = 0
        self.reset_stats()

    def _allocator(self, pool: PoolSpec, max_context: int):
        from sglang.srt.mem_cache.allocator import (
            PagedTokenToKVPoolAllocator,
            TokenToKVPoolAllocator,
        )

        cap, dt = pool.token_capacity, torch.float16
        if pool.config is None:
            if self.ps == 1:
                return TokenToKVPoolAllocator(cap, dt, "cpu", pool, need_sort=False), None, None
            alloc = PagedTokenToKVPoolAllocator(cap, self.ps, dt, "cpu", pool, need_sort=False)
            return alloc, None, None
        from kvarn_sglang.serving.allocator import KVarNPagedAllocator
        from kvarn_sglang.serving.backend import KVarNAttnBackend
        from kvarn_sglang.serving.pool import KVarNTokenToKVPool

        cfg = pool.config
        kv = KVarNTokenToKVPool(
            cap, self.ps, dt, 1, cfg.head_dim, 1, "cpu", False, start_layer=0, end_layer=1,
            kvarn_config=cfg, num_slots=pool.num_slots,
        )  # fmt: skip
        alloc = KVarNPagedAllocator(cap, self.ps, dt, "cpu", kv, need_sort=False)
        runner = SimpleNamespace(token_to_kv_pool=kv, req_to_token_pool=self.req_pool)
        self.layer = SimpleNamespace(
            layer_id=0, tp_q_head_num=1, tp_k_head_num=1, qk_head_dim=cfg.head_dim,
            scaling=cfg.head_dim**-0.5,
        )  # fmt: skip
        n = max(max_context, self.max_prefill, self.chunk or 0) + self.max_running + 1
        self.kv_values = torch.randn(n, 1, cfg.head_dim, generator=torch.Generator().manual_seed(0))
        return alloc, kv, KVarNAttnBackend(runner)

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        self.tree.evicted = 0
        keys = ("requests", "prompt_tokens", "cached_tokens", "reprefilled_tokens",
                "prefill_tokens", "prefill_passes", "decode_steps", "retractions",
                "aborted", "pages_quantized", "pages_completed", "sink_hits")  # fmt: skip
        self.stats = dict.fromkeys(keys, 0)
        self.series = {"decode_batch": [], "decode_batch_waiting": [], "slots_held": [],
                       "cached_sink_slots": [], "tokens_used": [], "ttft_steps": []}  # fmt: skip

    # ------------------------------------------------------------------ requests
    def submit(self, spec: Spec) -> None:
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        params = SamplingParams(max_new_tokens=self.max_new if spec.gen_len else 0,
                                temperature=0.0)  # fmt: skip
        params.normalize(None)
        req = Req(rid=str(spec.sid), origin_input_text="", origin_input_ids=spec.prompt(),
                  sampling_params=params)  # fmt: skip
        self.specs[req.rid], self.ready[req.rid] = spec, self.step_no
        self.waiting.append(req)

    def _emit(self, req) -> None:
        """The model's next token: the workload's own output, then a stop."""
        from sglang.srt.managers.schedule_batch import FINISH_MATCHED_TOKEN

        spec = self.specs[req.rid]
        n = len(req.output_ids)
        token = spec.output[n] if n < spec.gen_len else 0
        req.output_ids.append(token)
        if spec.gen_len and n + 1 >= spec.gen_len:
            req.to_finish = FINISH_MATCHED_TOKEN(matched=token)
        req.update_finish_state()

    def _finish(self, req) -> None:
        from sglang.srt.mem_cache.base_prefix_cache import InsertParams
        from sglang.srt.mem_cache.common import release_kv_cache
        from sglang.srt.mem_cache.radix_cache import RadixKey

        release_kv_cache(req, self.tree, checkpoint=True)
        spec = self.specs.pop(req.rid)
        full = spec.prompt() + spec.output[: max(0, spec.gen_len - 1)]  # what has KV
        self.shadow.insert(InsertParams(key=RadixKey(full[: len(full) // self.ps * self.ps])))
        for child in spec.children:
            self.submit(child)

    # ------------------------------------------------------------------ scheduler
    def run(self, roots: list[Spec]) -> None:
        """Serve ``roots`` and every request they lead to, to the end."""
        for spec in roots:
            self.submit(spec)
        while True:
            self._merge_last_batch()
            if not (self.waiting or self.chunked or not self.running.is_empty()):
                return
            if not self.step():
                raise RuntimeError(f"{self.spec.name}: a waiting request never fits")

    def _merge_last_batch(self) -> None:
        """The start of ``get_next_batch_to_run``: the last prefill batch joins the running
        batch; the chunked request stays out and checkpoints what it computed."""
        from sglang.srt.mem_cache.common import checkpoint_kv_cache

        if self.last_batch is not None:
            if self.chunked is not None and self.chunked.extend_end > self.chunked.prefix_len:
                checkpoint_kv_cache(self.chunked, self.tree)  # stash_chunked_request
            last, size = self.last_batch, self.last_batch.batch_size()
            last.filter_batch(reqs_to_exclude=[self.chunked] if self.chunked else [])
            if last.batch_size() < size:
                self.running.batch_is_full = False
            if not last.is_empty():
                if self.running.is_empty():
                    self.running = last
                else:
                    self.running.merge_batch(last)
            self.last_batch = None
        size = self.running.batch_size()
        self.running.filter_batch()  # finished requests leave, and make room
        if self.running.batch_size() < size:
            self.running.batch_is_full = False

    def step(self) -> bool:
        """One forward pass (prefill or decode) and its results; False if nothing could run."""
        if not self.forward():
            return False
        self.process()
        return True

    def forward(self) -> bool:
        """Schedule and run one pass, leaving its results to ``process``; False if nothing
        could run. Tensor-parallel ranks run a pass each before any processes its results
        (between the two, ``process`` exchanges the plugin's request flags over
        ``tp_cpu_group``)."""
        self._abort_pending_chunk()
        self._merge_last_batch()
        self.step_no += 1
        batch = self._prefill_batch()
        if batch is not None:
            self._forward_extend(batch)
            self.last_batch = batch
            self.pending = (batch, False)
        elif not self.running.is_empty():
            self.pending = (self.running, True) if self._forward_decode() else None
        else:
            return False
        return True

    def process(self) -> None:
        """The results of the pass ``forward`` ran: the plugin's hook on SGLang's
        ``Scheduler.run_batch`` (requests whose K/V turned non-finite are aborted), then the
        next token of every request."""
        if self.pending is not None:
            from kvarn_sglang.patches.scheduler import after_run_batch

            batch, decode = self.pending
            self.pending = None
            after_run_batch(None, self, batch)
            (self._decode_results if decode else self._extend_results)(batch)
        self._sample()

    @property
    def token_to_kv_pool_allocator(self):  # what the plugin's scheduler hook reads
        return self.alloc

    @property
    def chunked_req(self):
        return self.chunked

    def _abort_pending_chunk(self) -> None:
        """``Scheduler.process_pending_chunked_abort``: the chunked request aborted in the
        last pass releases its KV without caching it before its next chunk."""
        from sglang.srt.mem_cache.common import release_kv_cache

        req, self._pending_chunked_abort_req = self._pending_chunked_abort_req, None
        if req is not None and req is self.chunked:
            release_kv_cache(req, self.tree, checkpoint=False)
            req.to_finish = req.discard_output_reason
            req.update_finish_state()
            self.chunked = None
            self._aborted(req)

    def _aborted(self, req) -> None:
        self.stats["aborted"] += 1
        self.specs.pop(req.rid, None)

    def _prefill_batch(self):
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        running = self.running
        if running.is_empty():
            running.batch_is_full = False
        if (running.batch_is_full or not self.waiting) and self.chunked is None:
            return None
        rows = self.req_pool.available_size()
        if rows <= 0 and self.chunked is None:
            running.batch_is_full = True
            return None
        self.policy.calc_priority(self.waiting, running)
        mixed = len(running.reqs) if self.mixed_chunk else 0  # the decode tokens it carries
        adder = PrefillAdder(
            self.ps, self.tree, self.alloc, running, self.ratio.current, self.max_prefill,
            self.chunk, mixed, max_running_requests=self.max_running,
        )  # fmt: skip
        if self.chunked is not None:
            self.chunked.init_next_round_input()
            self.chunked = adder.add_chunked_req(self.chunked)
        for req in self.waiting:
            if adder.budget_state() == AddReqResult.OTHER:
                break
            held = sum(r.kv.holds_kv for r in adder.can_run_list)
            if len(adder.can_run_list) >= min(self.max_running - len(running.reqs), rows + held):
                running.batch_is_full = True
                break
            req.init_next_round_input(self.tree)
            result = adder.add_one_req(req, has_chunked_req=self.chunked is not None,
                                       truncation_align_size=None)  # fmt: skip
            if result != AddReqResult.CONTINUE:
                if result == AddReqResult.NO_TOKEN:
                    running.batch_is_full = bool(adder.can_run_list) or not running.is_empty()
                break
        if not adder.can_run_list:
            return None
        admitted = set(adder.can_run_list)
        self.waiting = [r for r in self.waiting if r not in admitted]
        if adder.new_chunked_req is not None:
            self.chunked = adder.new_chunked_req
        if self.chunked is not None:
            self.chunked.inflight_middle_chunks += 1
        batch = ScheduleBatch.init_new(
            adder.can_run_list, self.req_pool, self.alloc, self.tree, self.model_config, False,
            SpeculativeAlgorithm.NONE, chunked_req=self.chunked,
        )  # fmt: skip
        self._count_admissions(adder.can_run_list)
        batch.prepare_for_extend()
        if self.mixed_chunk and not running.is_empty() and running.check_decode_mem():
            # ``--enable-mixed-chunk``: the running requests' decode step rides along.
            running.prepare_for_decode()
            batch.mix_with_running(running)
            batch.decoding_reqs = running.reqs
            self.running = ScheduleBatch(reqs=[], batch_is_full=running.batch_is_full)
        return batch

    def _count_admissions(self, reqs) -> None:
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        s = self.stats
        for r in reqs:
            if r.kv.holds_kv or r.rid in self.counted:
                continue  # a later chunk, or a retracted request again: counted once
            self.counted.add(r.rid)
            fill = r.full_untruncated_fill_ids
            key = RadixKey(fill[: len(fill) - 1])
            known = self.shadow.match_prefix(MatchPrefixParams(key=key)).device_prefix_len
            s["requests"] += 1
            s["prompt_tokens"] += len(fill)
            s["cached_tokens"] += r.prefix_len
            s["reprefilled_tokens"] += max(0, known - r.prefix_len)
            if self.spec.config is not None and r.prefix_len >= self.ps:
                s["sink_hits"] += 1

    def _forward_extend(self, batch) -> None:
        self.stats["prefill_passes"] += 1
        self.stats["prefill_tokens"] += batch.extend_num_tokens
        self._write_kv(batch, batch.prefix_lens, batch.seq_lens_cpu.tolist(), decode=False)

    def _extend_results(self, batch) -> None:
        from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache

        decoding = {id(r) for r in batch.decoding_reqs or []}  # a mixed batch's decode rows
        self.alloc.free_group_begin()
        for req in batch.reqs:
            if req.discard_output_reason is not None and req.inflight_middle_chunks <= 0:
                req.to_finish = req.discard_output_reason  # aborted in the pass
                req.update_finish_state(0)
                release_kv_cache(req, self.tree, checkpoint=False)
                self._aborted(req)
                continue
            if req.inflight_middle_chunks > 0:
                req.inflight_middle_chunks -= 1
                continue
            if self.specs[req.rid].gen_len and not req.output_ids:  # its first token
                self.series["ttft_steps"].append(self.step_no - self.ready[req.rid])
            self._emit(req)
            if req.finished():
                self._finish(req)
            elif id(req) not in decoding:
                checkpoint_kv_cache(req, self.tree)
        self.alloc.free_group_end()

    def _forward_decode(self) -> bool:
        """Check memory (retract if short), then one decode pass; False if every request
        was retracted."""
        running = self.running
        if not running.check_decode_mem():
            retracted, ratio, aborted = running.retract_decode()
            self.ratio.current = ratio
            self.stats["retractions"] += len(retracted)
            self.stats["aborted"] += len(aborted)
            self.waiting += retracted
            running.batch_is_full = False
            if running.is_empty():
                return False
        else:
            self.ratio.decay_step()
        running.prepare_for_decode()
        seq = running.seq_lens_cpu.tolist()
        self._write_kv(running, [s - 1 for s in seq], seq, decode=True)
        self.stats["decode_steps"] += 1
        self.series["decode_batch"].append(len(running.reqs))
        if self.waiting:  # work is waiting: the batch is what memory and the cap allow
            self.series["decode_batch_waiting"].append(len(running.reqs))
        return True

    def _decode_results(self, running) -> None:
        from sglang.srt.mem_cache.common import release_kv_cache

        self.alloc.free_group_begin()
        for req in running.reqs:
            if req.to_finish is not None and req.skip_radix_cache_insert:  # aborted in the pass
                req.update_finish_state()
                release_kv_cache(req, self.tree, checkpoint=True)  # nothing is inserted
                self._aborted(req)
                continue
            self._emit(req)
            if req.finished():
                self._finish(req)
        self.alloc.free_group_end()

    def _write_kv(self, batch, pre: list[int], seq: list[int], *, decode: bool) -> None:
        if self.backend is None:
            return
        g, sink = self.ps, self.spec.config.sink_pages
        for p, s in zip(pre, seq, strict=True):  # pages this pass completes, past the sinks
            self.stats["pages_completed"] += max(0, s // g - max(p // g, sink))
        fb = SimpleNamespace(
            forward_mode=_Mode(decode), seq_lens_cpu=torch.tensor(seq), extend_prefix_lens_cpu=pre,
            req_pool_indices=batch.req_pool_indices, out_cache_loc=batch.out_cache_loc,
        )  # fmt: skip
        store = self.kv.store
        self.backend.init_forward_metadata(fb)
        before = int(store.commits.sum())
        self.backend.write_kv(*self.new_kv(batch, pre, seq), self.layer, fb)
        self.stats["pages_quantized"] += int(store.commits.sum()) - before
        assert int(store.commits.max()) <= 1, "a page was quantized twice"

    def new_kv(self, batch, pre: list[int], seq: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The "model's" K and V ``[N, 1, head_dim]`` of a pass's new tokens (random)."""
        kv = self.kv_values[: len(batch.out_cache_loc) + 1]
        return kv[:-1], kv[1:]

    def _sample(self) -> None:
        """Per-step series: KV tokens in use, fp16 slots held and held by cached sinks."""
        self.series["tokens_used"].append(self.spec.token_capacity - self.alloc.available_size())
        if self.kv is not None:
            store = self.kv.store
            store.flush_released()
            live = self.alloc.slot_budget(self.tree).live_sinks
            self.series["slots_held"].append(store.num_slots - store.free_slots)
            self.series["cached_sink_slots"].append(int(self.alloc._sinks().sum()) - len(live))


def check_no_leak(server: SchedServer) -> None:
    """After a run: no request left, every page free or in the tree, every request row
    free; with KVarN, tree pages past the sinks were quantized exactly once and only sink
    pages hold fp16 slots. Evicting the tree then returns every page and every slot."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    assert not server.waiting and server.running.is_empty() and server.chunked is None
    cap, tree, alloc = server.spec.token_capacity, server.tree, server.alloc
    in_tree = tree.total_size()[0] if server.spec.radix else 0
    assert alloc.available_size() + in_tree == cap, "pages leaked"
    assert server.req_pool.available_size() == server.max_running, "request rows leaked"
    if server.kv is not None:
        store = server.kv.store
        held = set(store.held_mask().nonzero().flatten().tolist())
        assert held == set(alloc._sinks().nonzero().flatten().tolist()), "non-sink slots held"
        pages = (tree.all_values_flatten().long() // server.ps).unique() if in_tree else None
        if pages is not None:
            rest = torch.tensor(sorted(set(pages.tolist()) - held), dtype=torch.long)
            assert bool((store.commits[rest] == 1).all()), "a tree page not quantized once"
    tree.evict(EvictParams(num_tokens=cap))
    assert alloc.available_size() == cap, "pages leaked after evicting the tree"
    if server.kv is not None:
        assert server.kv.store.free_slots == server.kv.store.num_slots, "fp16 slots leaked"
