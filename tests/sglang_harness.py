"""A scheduler-shaped driver of SGLang's real memory classes with the KVarN pool and backend.

``SimServer`` owns SGLang's ``ReqToTokenPool``, ``RadixCache`` and our
``KVarNPagedAllocator``/``KVarNTokenToKVPool``/``KVarNAttnBackend``, and runs requests the
way the scheduler does: match the prefix in the tree, allocate, extend in chunks, decode,
insert into the tree, free. The "model" gives every (layer, token, position) a fixed Q/K/V,
so the dense spec (``ref_decode_consistent_attention``) says what every output must be.

What it stands in for, and why it stays: SGLang's request lifecycle itself is proven by the
real engine (``tests/test_server.py``: the HTTP server, scheduler and model runner on a CPU;
``tests/test_model_runner.py``: SGLang's own pool construction and decode loop). This driver
still earns its place where the real engine cannot reach quickly: exact outputs against the
dense spec for every layer and position (a real model has no closed-form answer), thousands
of random operations per second (``test_random_operations_leave_no_leak_and_stay_exact``,
``tests/stress.py``), and CUDA-graph-shaped decode replays with garbage padding rows on a CPU.
The pool is built with the layer range SGLang passes (``start_layer=0``, ``end_layer`` =
number of layers, exclusive), as ``KVCacheConfigurator`` does.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.quant.reference import ref_decode_consistent_attention
from kvarn_sglang.serving.allocator import KVarNPagedAllocator
from kvarn_sglang.serving.backend import KVarNAttnBackend
from kvarn_sglang.serving.pool import KVarNTokenToKVPool


class _Mode:
    def __init__(self, decode: bool) -> None:
        self.decode = decode

    def is_decode(self) -> bool:
        return self.decode


@dataclass
class SimRequest:
    tokens: list[int]
    row: int
    cached_len: int
    node: object
    kv_len: int
    lock: object = None  # the unified tree's lock receipt
    outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # position -> per layer


class SimServer:
    def __init__(
        self, cfg: KVarNConfig, *, num_pages=48, num_slots=32, layers=2, hkv=2, group=2,
        tree: str = "radix", max_context: int | None = None, dtype: torch.dtype = torch.float16,
    ):  # fmt: skip
        g, d = cfg.page_size, cfg.head_dim
        self.cfg, self.g, self.d, self.hkv, self.hq = cfg, g, d, hkv, hkv * group
        max_context = max_context or 16 * g
        self.req_pool = ReqToTokenPool(
            size=16, max_context_len=max_context, device="cpu", enable_memory_saver=False
        )
        size = num_pages * g
        self.pool = KVarNTokenToKVPool(
            size, g, dtype, hkv, d, layers, "cpu", False,
            start_layer=0, end_layer=layers, kvarn_config=cfg, num_slots=num_slots,
        )  # fmt: skip
        self.alloc = KVarNPagedAllocator(size, g, dtype, "cpu", kvcache=self.pool, need_sort=False)
        params = CacheInitParams(
            disable=False, req_to_token_pool=self.req_pool, token_to_kv_pool_allocator=self.alloc,
            page_size=g,
        )  # fmt: skip
        if tree in ("unified", "unified-python"):  # SGLang's default tree cache
            params.tree_components = (ComponentType.FULL,)
            if tree == "unified-python":  # its Python tree core instead of the native one
                params.tree_core_backend = "python"
            self.tree = UnifiedRadixCache(params)
        elif tree == "radix":
            self.tree = RadixCache(params)
        else:
            raise ValueError(
                f"Unsupported tree {tree!r}: expected 'radix', 'unified' or 'unified-python'"
            )
        runner = SimpleNamespace(token_to_kv_pool=self.pool, req_to_token_pool=self.req_pool)
        self.backend = KVarNAttnBackend(runner)
        self.layers = [
            SimpleNamespace(
                layer_id=i, tp_q_head_num=self.hq, tp_k_head_num=hkv, qk_head_dim=d,
                scaling=d**-0.5,
            )
            for i in range(layers)
        ]  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        self.tok_emb = torch.randn(layers, 64, 3, self.hq, d, generator=gen)
        self.pos_emb = torch.randn(layers, max_context, 3, self.hq, d, generator=gen) * 0.5

    # ------------------------------------------------------------------ the "model"
    def qkv(self, layer: int, tokens: list[int], start: int):
        """q ``[T, Hq, D]``, k, v ``[T, Hkv, D]`` (fp16 values) of tokens at start.."""
        t = torch.tensor(tokens) % self.tok_emb.shape[1]
        x = self.tok_emb[layer, t] + self.pos_emb[layer, start : start + len(tokens)]
        x = x.half().float()
        return x[:, 0], x[:, 1, : self.hkv] * 2, x[:, 2, : self.hkv]

    def expected(self, tokens: list[int], layer: int) -> torch.Tensor:
        q, k, v = self.qkv(layer, tokens, 0)
        return ref_decode_consistent_attention(q, k, v, self.cfg, self.d**-0.5)

    # ------------------------------------------------------------------ lifecycle
    def start(self, tokens: list[int]) -> SimRequest | None:
        m = self.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
        cached = m.device_prefix_len
        if cached >= len(tokens):  # keep at least one token to compute
            cached = (len(tokens) - 1) // self.g * self.g
        rows = self.req_pool.alloc_rows(1)
        if rows is None:
            return None
        lock = self.tree.inc_lock_ref(m.last_device_node)
        idx = self.tree.path_device_indices(m.last_device_node)[:cached]
        self.req_pool.write((rows[0], slice(0, cached)), idx.to(torch.int32))
        return SimRequest(tokens, rows[0], cached, m.last_device_node, cached, lock)

    def _alloc(self, fn, num_tokens: int, *args):
        """Allocate the way SGLang's scheduler does: evict for ``num_tokens`` (its
        conservative demand) through the allocator, then allocate; None if out of memory."""
        self.alloc.evict_to_free_tokens(self.tree, num_tokens)
        return fn(*args)

    def extend(self, reqs: list[SimRequest], counts: list[int]) -> bool:
        """One extend pass over ``reqs``, ``counts[i]`` new tokens each. False if out of KV."""
        pre = [r.kv_len for r in reqs]
        seq = [p + c for p, c in zip(pre, counts, strict=True)]
        last = [
            int(self.req_pool.req_to_token[r.row, p - 1]) if p else -1
            for r, p in zip(reqs, pre, strict=True)
        ]
        loc = self._alloc(
            self.alloc.alloc_extend, sum(counts) + len(reqs) * self.g,
            torch.tensor(pre), torch.tensor(pre), torch.tensor(seq), torch.tensor(seq),
            torch.tensor(last), sum(counts),
        )  # fmt: skip
        if loc is None:
            return False
        start = 0
        for r, p, s in zip(reqs, pre, seq, strict=True):
            self.req_pool.write((r.row, slice(p, s)), loc[start : start + s - p].to(torch.int32))
            start += s - p
        self._forward(reqs, pre, seq, loc, decode=False)
        return True

    def decode(self, reqs: list[SimRequest], graph_bs: int | None = None) -> bool:
        """One decode step. With ``graph_bs``, run it the way a CUDA-graph replay does: the
        batch padded to ``graph_bs`` rows and the metadata from ``init_forward_metadata_out_graph``
        (the first call sets up the static buffers)."""
        seq = [r.kv_len + 1 for r in reqs]
        last = torch.tensor([int(self.req_pool.req_to_token[r.row, r.kv_len - 1]) for r in reqs])
        loc = self._alloc(
            self.alloc.alloc_decode, len(reqs) * self.g, torch.tensor(seq), torch.tensor(seq), last
        )
        if loc is None:
            return False
        for r, s, slot in zip(reqs, seq, loc.tolist(), strict=True):
            self.req_pool.req_to_token[r.row, s - 1] = slot
        self._forward(reqs, [s - 1 for s in seq], seq, loc, decode=True, graph_bs=graph_bs)
        return True

    def _forward(self, reqs, pre, seq, loc, decode: bool, graph_bs: int | None = None) -> None:
        """One pass over every layer; with ``graph_bs``, a decode step padded to ``graph_bs``
        rows (padding rows carry garbage) and planned the way a CUDA-graph replay is."""
        pad = 0 if graph_bs is None else graph_bs - len(reqs)
        fb = SimpleNamespace(
            forward_mode=_Mode(decode), extend_prefix_lens_cpu=pre, batch_size=len(reqs) + pad,
            num_padding=pad, seq_lens=torch.tensor(seq + [1] * pad),
            seq_lens_cpu=torch.tensor(seq + [1] * pad),
            req_pool_indices=torch.tensor([r.row for r in reqs] + [0] * pad),
            out_cache_loc=torch.cat([loc, torch.zeros(pad, dtype=loc.dtype)]),
        )  # fmt: skip
        if graph_bs is None:
            self.backend.init_forward_metadata(fb)
        else:
            if self.backend.graph_page_table is None:
                self.backend.init_cuda_graph_state(max_bs=graph_bs, max_num_tokens=graph_bs)
            self.backend.init_forward_metadata_out_graph(fb)
            self.backend.init_forward_metadata_in_graph(fb)
        for layer in self.layers:
            parts = [
                self.qkv(layer.layer_id, r.tokens[p:s], p)
                for r, p, s in zip(reqs, pre, seq, strict=True)
            ]
            q, k, v = (torch.cat([x[i] for x in parts]) for i in range(3))
            noise = torch.randn(pad, *q.shape[1:]) * 1e3
            q, k, v = (torch.cat([x, noise[:, : x.shape[1]]]) for x in (q, k, v))
            fwd = self.backend.forward_decode if decode else self.backend.forward_extend
            out = fwd(q.reshape(len(q), -1), k, v, layer, fb).view(-1, self.hq, self.d)
            start = 0
            for r, p, s in zip(reqs, pre, seq, strict=True):
                for i in range(s - p):
                    r.outputs.setdefault(p + i, []).append(out[start + i].float())
                start += s - p
        for r, s in zip(reqs, seq, strict=True):
            r.kv_len = s

    def finish(self, r: SimRequest) -> None:
        """Insert the request's full pages into the tree and free the rest."""
        idx = self.req_pool.req_to_token[r.row, : r.kv_len].long().clone()
        aligned = r.kv_len // self.g * self.g
        key = RadixKey(array("q", r.tokens[:aligned]))
        if isinstance(self.tree, UnifiedRadixCache):  # frees our duplicate pages itself
            self.tree.insert(
                InsertParams(key=key, value=idx[:aligned].clone(), prev_prefix_len=r.cached_len)
            )
        else:
            res = self.tree.insert(InsertParams(key=key, value=idx[:aligned].clone()))
            if res.prefix_len > r.cached_len:  # pages the tree already had: ours are duplicates
                self.alloc.free(idx[r.cached_len : res.prefix_len])
        if r.kv_len > aligned:
            self.alloc.free(idx[aligned:])
        self._unlock(r)
        self.req_pool.free_rows([r.row])

    def _unlock(self, r: SimRequest) -> None:
        if isinstance(self.tree, UnifiedRadixCache):
            self.tree.dec_lock_ref(r.node, r.lock.to_dec_params())
        else:
            self.tree.dec_lock_ref(r.node)

    def abort(self, r: SimRequest) -> None:
        """Drop a request without caching anything it computed."""
        idx = self.req_pool.req_to_token[r.row, r.cached_len : r.kv_len].long()
        if len(idx):
            self.alloc.free(idx)
        self._unlock(r)
        self.req_pool.free_rows([r.row])
