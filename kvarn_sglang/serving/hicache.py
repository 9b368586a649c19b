"""SGLang's hierarchical cache over a KVarN pool: the cache controller and its assembly.

SGLang 0.5.23 builds the host tier of ``--enable-hierarchical-cache`` in
``mem_cache/hybrid_cache/hybrid_pool_assembler.py``: the first registered ``StackStrategy``
that matches the device pool builds the host pools and the cache controller. For a plain
MHA pool that is ``_PlainKvStrategy``, whose host pool copies dense K/V buffers
(``get_device_pool_infos``); the ``host_pool_builder`` of a pool's ``host_pool_decls()`` is
used only for dependent pools, never for the primary KV pool. So the KVarN pool declares its
host pool (``KVarNTokenToKVPool.host_pool_decls``: packed bytes per token, built by
``KVarNHostPoolBuilder``) and ``KVarNStackStrategy``, registered ahead of SGLang's own
(``register_stack_strategy``, from ``kvarn_sglang.patches.hicache``), builds what it declares
and a ``KVarNCacheController``: SGLang's ``HybridCacheController`` with the four places where
a KVarN page differs from a dense one:

* **backup allocation** (``allocate_host_transfers``): the device pages that hold an fp16 slot
  are sink pages; their host pages take ``sink_records`` records (``host_pool``). If the arena
  is short, host pages are evicted through the tree (``reclaim_host``) and it tries once more;
  otherwise the backup is skipped, as SGLang skips one when host memory is full;
* **load allocation** (``load``): loaded pages are complete, so packed pages take no fp16 slot
  and sink pages take one (``KVarNPagedAllocator.alloc_loaded``), instead of SGLang's
  ``alloc``, which gives every page outside a forward pass a slot;
* **L3 objects** (``alloc_prefetch_host_buffers``, ``_generic_page_get/_set``): the first
  ``sink_pages`` pages of a sequence are sink pages, stored as fp16 objects; the rest are
  packed; the host pool's ``storage_format_tag`` puts the preset into every key;
* **bytes** (``_transfer_num_bytes``, ``l3_bytes_*``): what was really moved.

Everything else (write policies, layer-wise loading with its per-layer events, host eviction,
prefetch, flush) is SGLang's, unchanged.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController
from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import (
    StackBuildResult,
    StackStrategy,
    build_pool_entry,
)
from sglang.srt.mem_cache.pool_host import HostPoolGroup
from sglang.srt.mem_cache.pool_host.host_pool_decl import HostPoolDecl, HostPoolStorageInfo

from kvarn_sglang.serving.host_pool import KVarNHostPool
from kvarn_sglang.serving.pool import KVarNTokenToKVPool

logger = logging.getLogger(__name__)


class KVarNHostPoolBuilder:
    """``HostPoolBuilder`` of the KVarN host pool (``host_pool_decl.HostPoolBuilder``)."""

    def validate(self, *, decl, transfer_page_size, packed_draft_device_pools) -> None:
        if packed_draft_device_pools:
            raise ValueError("KVarN HiCache has no draft-model pages (speculative decoding)")
        if transfer_page_size != decl.device_pool.page_size:
            raise ValueError(
                f"Unsupported page_size {transfer_page_size}: the KVarN host pool moves whole "
                f"pages of {decl.device_pool.page_size} tokens"
            )

    def build(self, *, decl, anchor_host, allocator_type, packed_draft_device_pools):
        from sglang.srt.runtime_context import get_memory

        self.validate(
            decl=decl,
            transfer_page_size=decl.device_pool.page_size,
            packed_draft_device_pools=packed_draft_device_pools,
        )
        memory = get_memory()
        return KVarNHostPool(
            decl.device_pool,
            memory.hicache_ratio,
            memory.hicache_size,
            decl.device_pool.page_size,
            allocator_type=allocator_type,
        )


def kvarn_host_pool_decl(pool: KVarNTokenToKVPool) -> HostPoolDecl:
    """The host pool a KVarN pool declares: packed bytes per token, built by our builder."""
    from sglang.srt.mem_cache.hicache_storage import PoolName

    cfg = pool.kvarn_config
    return HostPoolDecl(
        pool_name=PoolName.KV,
        device_pool=pool,
        indices_from_pool=None,
        layout_source=None,
        storage_info=HostPoolStorageInfo(
            bytes_per_token_per_layer=pool.head_num * cfg.page_bytes // cfg.page_size,
            dtype=torch.uint8,
        ),
        host_pool_builder=KVarNHostPoolBuilder(),
    )


class KVarNCacheController(HybridCacheController):
    """``HybridCacheController`` for a KVarN pool (see the module docstring)."""

    reclaim_host = None  # the tree's ``evict_host(num_tokens)``, set by the strategy
    l3_bytes_written = 0
    l3_bytes_read = 0
    backups_skipped = 0  # backups refused because the host arena stayed short

    @property
    def host_pool(self) -> KVarNHostPool:
        return self.mem_pool_host.anchor_entry.host_pool

    def _alloc_host(self, num_tokens: int, sinks: list[int], reclaim) -> torch.Tensor | None:
        pool = self.host_pool
        indices = pool.alloc_pages(num_tokens, sinks)
        reclaim = reclaim or self.reclaim_host
        if indices is None and reclaim is not None:
            short = pool.tokens_for(num_tokens, len(sinks)) - pool.available_size()
            reclaim(max(short, self.page_size))
            indices = pool.alloc_pages(num_tokens, sinks)
        return indices

    def allocate_host_transfers(
        self, device_indices, extra_pools=None, *, reclaim=None, start_owner=None
    ):
        if extra_pools:
            raise ValueError("KVarN HiCache has no side pools")
        sinks = self.host_pool.device_sink_offsets(device_indices)
        host_indices = self._alloc_host(len(device_indices), sinks, reclaim)
        if host_indices is None:
            self.backups_skipped += 1
            return None
        return host_indices, None

    def load(
        self,
        host_indices,
        priority=None,
        node_id=-1,
        extra_pools=None,
        *,
        device_indices=None,
        anchor_indices=None,
    ):
        if device_indices is not None or extra_pools:
            raise NotImplementedError("KVarN HiCache loads into pages it allocates itself")
        if host_indices.numel():
            pool = self.host_pool
            sinks = torch.nonzero(pool.is_sink(pool.pages_of(host_indices))).flatten()
            device_indices = self.mem_pool_device_allocator.alloc_loaded(
                len(host_indices), sinks.tolist()
            )
            if device_indices is None:
                return None
        return super().load(host_indices, priority, node_id, device_indices=device_indices)

    def _transfer_num_bytes(self, op) -> int:
        return self.host_pool.transfer_bytes(op.host_indices)

    # ------------------------------------------------------------------ L3
    def _prefetch_sinks(self, operation, num_tokens: int) -> list[int]:
        """Page positions, within a prefetch of ``num_tokens``, that are sink pages: the
        first ``sink_pages`` pages of the sequence."""
        g, sink = self.page_size, self.host_pool.config.sink_pages
        first = getattr(operation, "storage_start", 0) // g
        first += getattr(operation, "prefetch_kv_page_offset", 0)
        return [j for j in range(num_tokens // g) if first + j < sink]

    def alloc_prefetch_host_buffers(self, operation, need_size: int):
        return self._alloc_host(need_size, self._prefetch_sinks(operation, need_size), None)

    def _generic_page_get(self, operation, hash_values, host_indices, extra_info=None) -> int:
        pool, g = self.host_pool, self.page_size
        sinks = pool.is_sink(pool.pages_of(host_indices[: len(hash_values) * g])).tolist()
        buffers = [pool.get_dummy_flat_data_page(sink) for sink in sinks]
        page_data = self.storage_backend.batch_get(hash_values, buffers)
        if page_data is None:
            return 0
        count = 0
        for i, data in enumerate(page_data):
            if data is None or operation.is_terminated():
                break
            pool.set_from_flat_data_page(host_indices[i * g], data)
            self.l3_bytes_read += buffers[i].numel()
            count += 1
        return count

    def _generic_page_set(self, hash_values, host_indices, extra_info=None) -> bool:
        pool, g = self.host_pool, self.page_size
        data = [pool.get_data_page(host_indices[i * g]) for i in range(len(hash_values))]
        ok = self.storage_backend.batch_set(hash_values, data)
        if ok:
            self.l3_bytes_written += sum(d.numel() for d in data)
        return ok

    def state(self) -> dict:
        return {
            **self.host_pool.state(),
            "write_policy": self.write_policy,
            "storage_backend": self.storage_backend_type,
            "l3_bytes_written": self.l3_bytes_written,
            "l3_bytes_read": self.l3_bytes_read,
            "backups_skipped_host_full": self.backups_skipped,
        }


class KVarNStackStrategy(StackStrategy):
    """Builds the HiCache stack of a KVarN pool: the host pool its declaration names and a
    ``KVarNCacheController``."""

    def matches(self, kvcache, components) -> bool:
        return isinstance(kvcache, KVarNTokenToKVPool)

    def build(
        self,
        *,
        cache,
        kvcache,
        params,
        server_args,
        load_cache_event,
        storage_backend=None,
        storage_backend_extra_config=None,
        prefetch_threshold=256,
        model_name=None,
        enable_storage_metrics=False,
    ):
        from sglang.srt.mem_cache.hicache_storage import PoolName
        from sglang.srt.mem_cache.hybrid_cache.host_pool_config import layout_root
        from sglang.srt.mem_cache.pool_host.common import get_allocator_type
        from sglang.srt.mem_cache.unified_cache.components import ComponentType
        from sglang.srt.runtime_context import get_memory

        if set(cache.components) != {ComponentType.FULL}:
            raise ValueError("KVarN HiCache serves full-attention KV only")
        decl = layout_root(kvcache.host_pool_decls())
        host_pool = decl.host_pool_builder.build(
            decl=decl, anchor_host=None, allocator_type=get_allocator_type(),
            packed_draft_device_pools=tuple(params.mtp_draft_device_pools),
        )  # fmt: skip
        layers = kvcache.layer_num
        group = HostPoolGroup(
            [
                build_pool_entry(
                    name=PoolName.KV,
                    host_pool=host_pool,
                    device_pool=kvcache,
                    layer_mapping={i: i for i in range(layers)},
                    transfer_layer_id_max=layers,
                    is_anchor=True,
                )
            ]
        )
        memory = get_memory()
        controller = KVarNCacheController(
            params.token_to_kv_pool_allocator, group, params.page_size, params.tp_cache_group,
            load_cache_event=load_cache_event, attn_cp_group=params.attn_cp_cache_group,
            attn_tp_group=params.attn_tp_cache_group, pp_group=params.pp_cache_group,
            write_policy=memory.hicache_write_policy, io_backend=memory.hicache_io_backend,
            storage_backend=storage_backend, prefetch_threshold=prefetch_threshold,
            model_name=model_name, storage_backend_extra_config=storage_backend_extra_config,
            transfer_layer_id_max=layers, enable_storage_metrics=enable_storage_metrics,
            host_memory_mode=memory.hicache_host_memory_mode,
        )  # fmt: skip
        controller.reclaim_host = cache.evict_host
        params.token_to_kv_pool_allocator.hicache = controller
        logger.info(
            "KVarN HiCache: %d host pages of %d tokens (%.1f MiB, %d B per page; a sink page "
            "takes %d), write policy %s, L3 %s (key tag %s)",
            host_pool.page_num, host_pool.page_size, host_pool.nbytes / 2**20,
            layers * host_pool.record_bytes, host_pool.sink_records,
            controller.write_policy, storage_backend, host_pool.storage_format_tag,
        )  # fmt: skip
        return StackBuildResult(
            host_pool_group=group,
            cache_controller=controller,
            component_host_pools={ComponentType.FULL: host_pool},
            pools_desc="KVarN KV",
            pool_declarations=(decl,),
        )
