"""``KVarNHostPool``: the host-memory tier of SGLang's hierarchical cache for a KVarN pool.

SGLang's HiCache (``--enable-hierarchical-cache``) backs the radix tree's device pages up to
host memory and loads them back on a hit. With ``--kv-cache kvarn`` a tree page is either a
committed packed page or a sink page (fp16, in an fp16 slot; ``pages``); pages that are still
filling never enter the tree. The host tier stores both as they are on the device, in
*records* of one page's packed bytes, one per layer::

    records  uint8 [num_records, layers, H * page_bytes]     (page-major: one record per page)

* a packed page takes one record: per layer exactly the device's packed record of its H KV
  heads (``k4v2_g128``, head_dim 128: 13,824 B per head instead of 65,536 B fp16);
* a sink page keeps its fp16 K/V (quantizing it on the way would change what a hit reads):
  ``2 * G * H * D`` 16-bit values per layer, spread over ``sink_records`` records (its own and
  ``sink_records - 1`` extra ones, 5 in all for every 4- and 2-bit preset with V at 2 bits),
  record ``j`` holding bytes ``[j * record, (j + 1) * record)`` of each layer's fp16 page.

SGLang's host allocator hands out page-aligned token indices (host page ``i`` = indices
``i * G .. i * G + G - 1`` = record ``i``); the extra records of a sink page are allocated from
the same free list (``alloc_pages``) and freed with it (``free``), so ``--hicache-ratio`` /
``--hicache-size`` size one arena in the bytes really allocated and a sink page costs what it
weighs. Only the cache controller (``hicache.KVarNCacheController``) knows which pages of an
allocation are sinks: the device pages that hold an fp16 slot when they are backed up, the
first ``sink_pages`` pages of a sequence when they are prefetched from L3.

Copies are torch indexing, per layer, on whatever stream SGLang's transfer engine runs them
(layer-wise loading: ``load_to_device_per_layer`` fills one layer and SGLang records that
layer's event). On CPU that is the whole story; on CUDA the records are pinned and each copy
goes through the device (gather, then one copy to or from pinned memory).

L3 (``--hicache-storage-backend file``) stores one object per page under SGLang's page hash:
a packed page's records of every layer, or a sink page's fp16 K/V of every layer
(``get_data_page``); the storage key carries ``storage_format_tag`` (preset, sink pages, fp16
dtype), so a server with another preset never reads these pages.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.mem_cache.pool_host.base import HostKVCache, synchronized

logger = logging.getLogger(__name__)


def storage_format_tag(config, dtype: torch.dtype) -> str:
    """The page format in L3 keys: preset, fp16 sink pages and the sink's 16-bit dtype."""
    return f"kvarn_{config.name}_sink{config.sink_pages}_{str(dtype).removeprefix('torch.')}"


class KVarNHostPool(HostKVCache):
    """Host records of a ``KVarNTokenToKVPool``'s pages (see the module docstring).

    Attributes:
        records: ``uint8 [num_records, layers, H * page_bytes]`` (SGLang's ``kv_buffer``).
        sink_extra: ``int64 [num_records, sink_records - 1]``, the extra records of a host
            page that holds a sink page, -1 for a packed page (CPU).
        bytes_to_host, bytes_to_device: bytes copied by backups and loads so far (and
            ``pages_to_host``, ``pages_to_device``: how many pages).
        pages_freed: host pages given back by the tree (host eviction) or a prefetch.
    """

    def __init__(
        self,
        device_pool,
        host_to_device_ratio: float,
        host_size: float,
        page_size: int,
        *,
        allocator_type: str = "default",
        pool_label: str = "kv",
    ) -> None:
        cfg = device_pool.kvarn_config
        if page_size != cfg.page_size:
            raise ValueError(
                f"Unsupported page_size {page_size}: preset {cfg.name} needs {cfg.page_size}"
            )
        self.device_pool = device_pool
        self.store = device_pool.store
        self.config = cfg
        self.layer_num = self.target_layer_num = device_pool.layer_num
        self.head_num = device_pool.head_num
        self.record_bytes = self.head_num * cfg.page_bytes  # one page, one layer
        slot_dtype = self.store.slot_k[0].dtype
        self.sink_bytes = 2 * cfg.page_size * self.head_num * cfg.head_dim * slot_dtype.itemsize
        self.sink_records = -(-self.sink_bytes // self.record_bytes)
        self.slot_dtype = slot_dtype
        self.storage_format_tag = storage_format_tag(cfg, slot_dtype)
        self.bytes_to_host = self.bytes_to_device = 0
        self.pages_to_host = self.pages_to_device = 0
        self.pages_freed = 0  # host pages given back (host eviction, prefetch rollback)
        self._plans: dict = {}
        per_token, rest = divmod(self.layer_num * self.record_bytes, cfg.page_size)
        on_cuda = torch.device(device_pool.device).type == "cuda"
        super().__init__(
            dtype=torch.uint8,
            device_capacity_tokens=device_pool.size,
            size_per_token=per_token if rest == 0 else per_token + rest / cfg.page_size,
            start_layer=device_pool.start_layer,
            end_layer=device_pool.end_layer,
            host_to_device_ratio=host_to_device_ratio,
            host_size=host_size,
            page_size=page_size,
            layout="page_first_direct",
            pin_memory=on_cuda,
            device="cpu",
            allocator_type=allocator_type,
            pool_label=pool_label,
        )

    # ------------------------------------------------------------------ geometry
    def get_size_per_token(self):
        return self.size_per_token

    def _allocate_host_buffer(self) -> None:
        """Allocate the records if the host has room for them. SGLang's own host pools also
        keep 10 GiB free for everything else; that reserve guards its auto-sized default
        (which KVarN keeps, ``hicache_auto_size``), while an explicit ``--hicache-ratio`` or
        ``--hicache-size`` is checked against what is available (cgroup-aware)."""
        from sglang.srt.mem_cache.host_memory import available_host_memory_bytes

        requested = self.page_num * self.layer_num * self.record_bytes
        available = available_host_memory_bytes(allow_cgroup_fallback=True)
        if requested > available:
            raise ValueError(
                f"Not enough host memory for the KVarN HiCache pool: {requested / 1e9:.2f} GB "
                f"requested, {available / 1e9:.2f} GB available; lower --hicache-ratio or "
                f"--hicache-size"
            )
        self.kv_buffer = self.init_kv_buffer()
        self.fd = None

    def init_kv_buffer(self) -> torch.Tensor:
        shape = (self.page_num, self.layer_num, self.record_bytes)
        self.sink_extra = torch.full((self.page_num, self.sink_records - 1), -1, dtype=torch.long)
        return torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin_memory)

    @property
    def records(self) -> torch.Tensor:
        return self.kv_buffer

    @property
    def nbytes(self) -> int:
        """Host bytes allocated for records (the sink bookkeeping aside)."""
        return self.kv_buffer.numel()

    def destroy(self) -> None:
        # Pinned through torch's allocator (not cudaHostRegister): nothing to unregister.
        self._destroyed = True
        self.kv_buffer = None

    # ------------------------------------------------------------------ allocation
    @synchronized
    def clear(self) -> None:
        super().clear()
        if hasattr(self, "sink_extra"):
            self.sink_extra.fill_(-1)
        self._plans = {}

    def pages_of(self, indices: torch.Tensor) -> torch.Tensor:
        """``int64 [n]``: the page (record) ids of page-aligned token indices ``[n * G]``."""
        return indices.to("cpu", torch.long)[:: self.page_size] // self.page_size

    def tokens_for(self, num_tokens: int, num_sinks: int) -> int:
        """Host tokens (records x G) that ``num_tokens`` tokens with ``num_sinks`` sink pages
        take."""
        return num_tokens + num_sinks * (self.sink_records - 1) * self.page_size

    @synchronized
    def alloc_pages(self, num_tokens: int, sink_offsets: list[int]) -> torch.Tensor | None:
        """Allocate ``num_tokens`` page-aligned host tokens whose pages at ``sink_offsets``
        (page positions within the allocation) hold sink pages; None if they do not fit."""
        extra = self.tokens_for(num_tokens, len(sink_offsets)) - num_tokens
        indices = self.alloc(num_tokens + extra)
        if indices is None or not sink_offsets:
            return indices
        own = self.pages_of(indices[:num_tokens])
        extras = self.pages_of(indices[num_tokens:]).view(len(sink_offsets), -1)
        self.sink_extra[own[torch.tensor(sink_offsets, dtype=torch.long)]] = extras
        return indices[:num_tokens]

    @synchronized
    def free(self, indices: torch.Tensor) -> int:
        pages = self.pages_of(indices)
        extra = self.sink_extra[pages].flatten()
        extra = extra[extra >= 0]
        if extra.numel():
            self.sink_extra[pages] = -1
            g = self.page_size
            tokens = (extra[:, None] * g + torch.arange(g)).flatten()
            super().free(tokens)
        freed = super().free(indices)
        self.pages_freed += freed // self.page_size
        return freed

    def device_sink_offsets(self, device_indices: torch.Tensor) -> list[int]:
        """Page positions, within page-aligned device token indices, of the pages that hold
        an fp16 slot: in the radix tree, exactly its sink pages (every other tree page is
        committed and gave its slot back)."""
        store = self.store
        store.flush_released()
        g = self.page_size
        pages = device_indices.to(torch.long)[::g] // g
        return torch.nonzero(store.page_slot[pages] != store.scratch).flatten().tolist()

    def is_sink(self, pages: torch.Tensor) -> torch.Tensor:
        """``bool [n]``: which host pages hold sink pages."""
        return self.sink_extra[pages, 0] >= 0

    def used_records(self) -> int:
        return self.page_num - self.available_size() // self.page_size

    @synchronized
    def state(self) -> dict:
        """What ``/get_server_info`` reports about the host tier."""
        sinks = int((self.sink_extra[:, 0] >= 0).sum())
        return {
            "host_pages_total": self.page_num,
            "host_pages_free": self.available_size() // self.page_size,
            "host_sink_pages": sinks,
            "host_records_per_sink_page": self.sink_records,
            "host_bytes": self.nbytes,
            "host_bytes_per_page": self.layer_num * self.record_bytes,
            "host_pages_freed": self.pages_freed,
            "bytes_to_host": self.bytes_to_host,
            "bytes_to_device": self.bytes_to_device,
            "pages_to_host": self.pages_to_host,
            "pages_to_device": self.pages_to_device,
            "fp16_bytes_per_page": self.layer_num * self.sink_bytes,
        }

    @synchronized
    def verify(self) -> list[str]:
        """Idle check of the host records: every record is free, or used by exactly one
        allocated host page (its own record or a sink page's extra one)."""
        self._merge_release_slots()
        free = self.free_slots[:: self.page_size] // self.page_size
        extra = self.sink_extra[self.sink_extra >= 0]
        problems = {
            "host records free twice": len(free) - int(torch.unique(free).numel()),
            "extra records of sink pages also free": int(torch.isin(extra, free).sum()),
            "extra records used twice": len(extra) - int(torch.unique(extra).numel()),
            "sink pages that are free": int(
                (self.sink_extra[free, 0] >= 0).sum() if len(free) else 0
            ),
            "host token slots neither free nor used": int(
                (~self.slot_used).sum() - len(self.free_slots)
            ),
        }
        return [f"kvarn host: {n} {what}" for what, n in problems.items() if n]

    # ------------------------------------------------------------------ device <-> host
    def _plan(self, host_indices: torch.Tensor, device_indices: torch.Tensor):
        """Host pages, device pages and their packed/sink split for one transfer (computed
        once per transfer; the per-layer loads of one transfer share it)."""
        # Keyed by the index tensors themselves (held here, so no new tensor can reuse their
        # memory and be mistaken for them).
        cached = self._plans.get("for")
        plan = self._plans.get("plan")
        if cached is None or cached[0] is not host_indices or cached[1] is not device_indices:
            hp = self.pages_of(host_indices)
            dp = device_indices.to(torch.long)[:: self.page_size] // self.page_size
            sink = self.is_sink(hp)
            dev = dp.device
            plan = {
                "packed_host": hp[~sink],
                "packed_dev": dp[~sink.to(dev)],
                "sink_records": torch.cat([hp[sink, None], self.sink_extra[hp[sink]]], 1),
                "sink_dev": dp[sink.to(dev)],
                "num_sinks": int(sink.sum()),
            }
            self._plans = {"for": (host_indices, device_indices), "plan": plan}
        return plan

    def transfer_bytes(self, host_indices: torch.Tensor) -> int:
        """Bytes one backup or load of ``host_indices`` moves, all layers."""
        pages = self.pages_of(host_indices)
        sinks = int(self.is_sink(pages).sum())
        per_layer = (len(pages) - sinks) * self.record_bytes + sinks * self.sink_bytes
        return self.layer_num * per_layer

    def _sink_chunks(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """fp16 sink pages ``k, v [s, G, H, D]`` as ``uint8 [s, sink_records, record]``."""
        flat = torch.stack([k, v], 1).contiguous().view(torch.uint8).view(len(k), -1)
        pad = self.sink_records * self.record_bytes - self.sink_bytes
        flat = torch.nn.functional.pad(flat, (0, pad))
        return flat.view(len(k), self.sink_records, self.record_bytes)

    def _unchunk(self, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of ``_sink_chunks``: ``uint8 [s, sink_records, record]`` to ``k, v``."""
        s, g, cfg = len(chunks), self.page_size, self.config
        flat = chunks.reshape(s, -1)[:, : self.sink_bytes].contiguous()
        kv = flat.view(self.slot_dtype).view(s, 2, g, self.head_num, cfg.head_dim)
        return kv[:, 0], kv[:, 1]

    def backup_from_device_all_layer(
        self, device_pool, host_indices, device_indices, io_backend
    ) -> None:
        """Copy the pages at ``device_indices`` into their host records, every layer: a
        packed page's record, a sink page's fp16 slot."""
        store = self.store
        store.flush_released()
        plan = self._plan(host_indices, device_indices)
        held = store.page_slot[plan["sink_dev"]]
        if plan["num_sinks"] and bool((held == store.scratch).any()):
            raise RuntimeError("KVarN HiCache: a sink page being backed up holds no fp16 slot")
        packed_host, records = plan["packed_host"], plan["sink_records"]
        for layer in range(self.layer_num):
            if len(packed_host):
                data = store.packed[layer][plan["packed_dev"]].flatten(1)
                self.kv_buffer[packed_host, layer] = data.to("cpu")
            if plan["num_sinks"]:
                chunks = self._sink_chunks(store.slot_k[layer][held], store.slot_v[layer][held])
                self.kv_buffer[records, layer] = chunks.to("cpu")
        self.bytes_to_host += self.transfer_bytes(host_indices)
        self.pages_to_host += len(host_indices) // self.page_size

    def load_to_device_per_layer(
        self, device_pool, host_indices, device_indices, layer_id, io_backend, *, is_draft=False
    ) -> None:
        """Copy one layer of the host pages at ``host_indices`` to the device pages at
        ``device_indices`` (sink pages into the fp16 slots the controller gave them)."""
        store, plan = self.store, self._plan(host_indices, device_indices)
        dev = store.page_slot.device
        if len(plan["packed_host"]):
            data = self.kv_buffer[plan["packed_host"], layer_id]
            shape = (len(data), self.head_num, self.config.page_bytes)
            store.packed[layer_id][plan["packed_dev"]] = data.view(shape).to(dev)
        if plan["num_sinks"]:
            slots = store.page_slot[plan["sink_dev"]]
            k, v = self._unchunk(self.kv_buffer[plan["sink_records"], layer_id].to(dev))
            store.slot_k[layer_id][slots] = k
            store.slot_v[layer_id][slots] = v
        if layer_id == self.layer_num - 1:
            self.bytes_to_device += self.transfer_bytes(host_indices)
            self.pages_to_device += len(host_indices) // self.page_size

    # ------------------------------------------------------------------ L3 pages
    def page_object_bytes(self, sink: bool) -> int:
        """Bytes of one page's L3 object: a packed page's records, or a sink page's fp16."""
        return self.layer_num * (self.sink_bytes if sink else self.record_bytes)

    def get_data_page(self, index, flat: bool = True) -> torch.Tensor:
        """The L3 object of the host page holding token index ``index``."""
        page = int(index) // self.page_size
        if not bool(self.sink_extra[page, 0] >= 0):
            return self.kv_buffer[page].flatten()
        rows = torch.cat([torch.tensor([page]), self.sink_extra[page]])
        data = self.kv_buffer[rows].transpose(0, 1).reshape(self.layer_num, -1)
        return data[:, : self.sink_bytes].flatten()

    def get_dummy_flat_data_page(self, sink: bool = False) -> torch.Tensor:
        return torch.zeros(self.page_object_bytes(sink), dtype=torch.uint8)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        page = int(index) // self.page_size
        data = data_page.view(torch.uint8).flatten()
        sink = bool(self.sink_extra[page, 0] >= 0)
        if data.numel() != self.page_object_bytes(sink):
            raise ValueError(
                f"Invalid shape of L3 page: expected {self.page_object_bytes(sink)} bytes "
                f"({'sink' if sink else 'packed'} page), got {data.numel()}"
            )
        if not sink:
            self.kv_buffer[page] = data.view(self.layer_num, self.record_bytes)
            return
        pad = self.sink_records * self.record_bytes - self.sink_bytes
        layers = torch.nn.functional.pad(data.view(self.layer_num, self.sink_bytes), (0, pad))
        rows = torch.cat([torch.tensor([page]), self.sink_extra[page]])
        chunks = layers.view(self.layer_num, self.sink_records, self.record_bytes)
        self.kv_buffer[rows] = chunks.transpose(0, 1)

    def is_stride_page_aligned(self, page_size_bytes: int = 4096) -> bool:
        return (self.layer_num * self.record_bytes) % page_size_bytes == 0
