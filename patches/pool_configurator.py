"""Hooks on ``sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator``
(sglang==0.5.23): SGLang's token capacity comes from KVarN's real bytes.

* ``_compute_cell_size`` (AFTER): bytes per token become the packed bytes (``page_bytes / G``
  per layer and KV head) instead of fp16's.
* ``__init__`` (AFTER): the fp16 slot pool is added to the fixed overhead, so the budget
  pays for it before any packed page.
* ``calculate_pool_sizes`` (AROUND): refuses a budget that cannot hold the slot pool plus one
  packed page per running request, naming the flags to change, instead of SGLang's generic
  "Not enough memory" (or a server that admits fewer requests than it was told to run).
"""

from __future__ import annotations

import torch

from kvarn_sglang.serving.capacity import kvarn_cell_bytes, slot_pool_bytes
from kvarn_sglang.serving.settings import KV_CACHE_CHOICE, active_settings

COMPUTE_CELL_SIZE = (
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"
)
CONFIGURATOR_INIT = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator.__init__"
CALCULATE_POOL_SIZES = (
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator.calculate_pool_sizes"
)


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
        slot_bytes = slot_pool_bytes(self._kvarn_fp16_cell, cfg, settings.num_slots)
        self._fixed_overhead_bytes += slot_bytes
        self._kvarn_budget = (settings, cfg, slot_bytes)
    return result


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def refuse_budget(
    available_bytes: int, overhead_bytes: int, cell_bytes: int, settings, cfg, slot_bytes: int
) -> None:
    """Raise ``ValueError`` unless the KV budget holds the fp16 slot pool and at least one
    packed page per running request (``cell_bytes``: packed bytes per token, all layers)."""
    running = settings.max_running_requests
    pages = max(0, available_bytes - overhead_bytes) // (cell_bytes * cfg.page_size)
    if pages >= running:
        return
    raise ValueError(
        f"--kv-cache kvarn: the KV budget ({_size(available_bytes)}) must hold the fp16 slot "
        f"pool ({settings.num_slots} slots, {_size(slot_bytes)}) and one packed page per running "
        f"request ({running}) but has room for {pages} pages: raise --mem-fraction-static, or "
        f"lower --kvarn-slots or --max-running-requests"
    )


def around_calculate_pool_sizes(original, self, available_bytes, page_size):
    found = getattr(self, "_kvarn_budget", None)
    if found is not None:
        refuse_budget(available_bytes, self._fixed_overhead_bytes, self._cell_size, *found)
    return original(self, available_bytes, page_size)
