"""Hooks on ``sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator``
(sglang==0.5.23): SGLang's token capacity comes from KVarN's real bytes.

* ``_compute_cell_size`` (AFTER): bytes per token become the packed bytes (``page_bytes / G``
  per layer and KV head) instead of fp16's.
* ``__init__`` (AFTER): the fp16 slot pool is added to the fixed overhead, so the budget
  pays for it before any packed page.
"""

from __future__ import annotations

import torch

from kvarn_sglang.capacity import kvarn_cell_bytes, slot_pool_bytes
from kvarn_sglang.settings import KV_CACHE_CHOICE, active_settings

COMPUTE_CELL_SIZE = (
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"
)
CONFIGURATOR_INIT = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator.__init__"


def _kvarn(kvc):
    if getattr(kvc, "kv_cache_dtype_str", None) != KV_CACHE_CHOICE:
        return None
    settings = active_settings()
    if settings is None:
        raise ValueError("--kv-cache kvarn is set but the KVarN plugin settings are missing")
    return settings, settings.config(kvc.model_config.head_dim)


def after_compute_cell_size(result, self, kvc, num_layers):
    found = _kvarn(kvc)
    if found is None:
        return result
    _, cfg = found
    self._kvarn_fp16_cell = result
    return kvarn_cell_bytes(result, cfg, torch._utils._element_size(kvc.kv_cache_dtype))


def after_init(result, self, kvc):
    found = _kvarn(kvc)
    if found is not None:
        settings, cfg = found
        self._fixed_overhead_bytes += slot_pool_bytes(
            self._kvarn_fp16_cell, cfg, settings.num_slots
        )
    return result
