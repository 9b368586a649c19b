"""``KVarNTokenToKVPool``: SGLang's token-to-KV pool with KVarN-packed pages.

One SGLang page of G tokens is one KVarN tile. Per layer and KV head a committed page is a
single record (``k4v2_g128``, head_dim 128; offsets in bytes)::

    0      k_codes  u8   [128 channels, 64]   4-bit K codes, packed along tokens
    8192   v_codes  u8   [128 tokens, 32]     2-bit V codes, packed along channels
    12288  k_scale  fp16 [128]  12544 k_zero fp16 [128]  12800 k_norm fp16 [128 tokens]
    13056  v_scale  fp16 [128]  13312 v_zero fp16 [128]  13568 v_norm fp16 [128 channels]
    13824  end  (108 B per token per head instead of 512)

so K = (code * k_scale[d] + k_zero[d]) * k_norm[t] and V = (code * v_scale[t] + v_zero[t]) *
v_norm[d], both in the Hadamard-rotated domain. Pages that are still filling and sink pages
live in an fp16 slot pool (``page_store``). ``set_kv_buffer`` writes new tokens into slots;
the attention backend commits pages that became full (once, before they are read quantized)
and releases their slots after the forward pass; the paired allocator
(``allocator.KVarNPagedAllocator``) gives pages their slots and releases the slots of pages
it frees (``pages`` draws a page's whole life). There is no dense K/V buffer:
``get_key_buffer`` refuses, so no other attention backend can read garbage from this pool.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.serving.page_store import PageStore
from kvarn_sglang.serving.settings import KVarNSettings, active_settings

logger = logging.getLogger(__name__)


class KVarNTokenToKVPool(MHATokenToKVPool):
    """An ``MHATokenToKVPool`` whose pages are stored KVarN-packed (see the module docstring).

    Takes SGLang's constructor arguments; the KVarN config and the number of fp16 slots come
    from the server's ``--kvarn-*`` flags (``kvarn_sglang.serving.settings``), or from the
    ``kvarn_config`` / ``num_slots`` keywords (tests, offline use).
    """

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        enable_memory_saver: bool,
        *args,
        kvarn_config: KVarNConfig | None = None,
        num_slots: int | None = None,
        **kwargs,
    ) -> None:
        settings = active_settings() or KVarNSettings()
        cfg = kvarn_config or settings.config(head_dim)
        if cfg.head_dim != head_dim or kwargs.get("v_head_dim", head_dim) not in (None, head_dim):
            raise ValueError(
                f"Unsupported head_dim {head_dim}/{kwargs.get('v_head_dim')}: KVarN needs equal "
                f"K and V head_dim matching its config ({cfg.head_dim})"
            )
        if page_size != cfg.page_size:
            raise ValueError(
                f"Unsupported page_size {page_size}: preset {cfg.name} needs --page-size "
                f"{cfg.page_size}"
            )
        self.kvarn_config = cfg
        self._num_slots = num_slots or settings.num_slots
        super().__init__(
            size, page_size, dtype, head_num, head_dim, layer_num, device, enable_memory_saver,
            *args, **kwargs,
        )  # fmt: skip

    def _create_buffers(self) -> None:
        from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE

        # The pages and slots live in the memory saver's KV-cache region, as SGLang's own
        # buffers do (``MHATokenToKVPool._create_buffers``); see ``page_store``.
        self.store = PageStore(
            self.kvarn_config,
            num_pages=(self.size + self.page_size) // self.page_size,
            num_slots=self._num_slots,
            layer_num=self.layer_num,
            head_num=self.head_num,
            dtype=self.dtype,
            device=self.device,
            buffers_region=self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE),
        )
        store, cfg = self.store, self.kvarn_config
        packed_token = cfg.page_bytes * self.layer_num * self.head_num / cfg.page_size
        logger.info(
            "KVarN pool: preset %s, %d layers x %d KV heads, %d packed pages (%d tokens, "
            "%.2f GiB) + %d fp16 slots (%d sink pages per prefix + a filling page per running "
            "request, %.2f GiB: they cost %d packed tokens; --kvarn-slots sets them)",
            cfg.name, self.layer_num, self.head_num, store.num_pages - 1, self.size,
            (store.nbytes - store.slot_nbytes) / 2**30, store.num_slots, cfg.sink_pages,
            store.slot_nbytes / 2**30, store.slot_nbytes // packed_token,
        )  # fmt: skip

    def get_kv_size_bytes(self) -> tuple[int, int]:
        total = self.store.nbytes
        return total // 2, total - total // 2

    def _get_key_buffer(self, layer_id: int):
        raise NotImplementedError(
            "KVarN pages are packed and have no dense K/V buffer: use --attention-backend kvarn"
        )

    _get_value_buffer = _get_key_buffer

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, *args, **kwargs) -> None:
        """Write new tokens ``cache_k/v [N, H, D]`` at flat token slots into fp16 slots."""
        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = kwargs.get("layer_id_override")
        layer_id = layer.layer_id if layer_id is None else layer_id
        self.store.write(layer_id - self.start_layer, loc, cache_k, cache_v)

    def host_pool_decls(self):
        """The host pool HiCache keeps for this pool: packed records (``host_pool``), built by
        ``hicache.KVarNHostPoolBuilder``; ``hicache.KVarNStackStrategy`` assembles it."""
        from kvarn_sglang.serving.hicache import kvarn_host_pool_decl

        return (kvarn_host_pool_decl(self),)

    def wait_for_layer(self, layer_id: int) -> None:
        """Wait until HiCache has loaded layer ``layer_id`` (local) of the pages a pass reads
        back from host memory (SGLang's layer-wise loading; a no-op without HiCache)."""
        if self.layer_transfer_counter is not None:
            self.layer_transfer_counter.wait_until(layer_id)

    # ------------------------------------------------------------ PD disaggregation (``pd``)
    def get_contiguous_buf_infos(self) -> tuple[list[int], list[int], list[int]]:
        """The packed page regions SGLang's transfer engines move, one per layer."""
        from kvarn_sglang.serving.pd import packed_buffer_infos

        return packed_buffer_infos(self.store)

    def get_kv_layer_ids(self) -> list[int]:
        """Model layer id of each region of ``get_contiguous_buf_infos``."""
        from kvarn_sglang.serving.pd import layer_ids

        return layer_ids(self.layer_num, self.start_layer)

    def pd_kv_layout(self) -> str:
        """What a PD peer must store alike (``pd.pd_layout``)."""
        from kvarn_sglang.serving.pd import pd_layout

        return pd_layout(self.kvarn_config, self.dtype)

    def get_cpu_copy(self, indices, mamba_indices=None, req_pool_index=None):
        """A request's pages in host memory (PD decode retraction, ``retraction_backup``)."""
        from kvarn_sglang.serving.retraction_backup import backup_pages

        return backup_pages(self.store, indices)

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None, req_pool_index=None):
        """Restore ``get_cpu_copy``'s pages into the pages now at token slots ``indices``."""
        from kvarn_sglang.serving.retraction_backup import restore_pages

        restore_pages(self.store, kv_cache_cpu, indices)

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
        raise NotImplementedError("KVarN does not support speculative decoding yet")
