from __future__ import annotations

import torch

from kvarn_sglang.format.config import get_preset
from kvarn_sglang.serving.capacity import (
    default_num_slots,
    kvarn_cell_bytes,
    slot_pool_bytes,
    token_capacity,
)
from kvarn_sglang.serving.pool import KVarNTokenToKVPool

# Llama-3-8B shape: 32 layers, 8 KV heads, head_dim 128, fp16 cache.
FP16_CELL = 32 * 8 * 2 * 128 * 2


def test_llama3_8b_holds_4_4x_the_tokens_of_fp16_in_40gb_with_64_running_requests():
    cfg = get_preset("k4v2_g128", head_dim=128)
    budget = 40 * 10**9
    fp16_tokens = budget // FP16_CELL
    slots = default_num_slots(64, cfg.sink_pages)
    tokens = token_capacity(budget, FP16_CELL, cfg, 2, slots)
    assert kvarn_cell_bytes(FP16_CELL, cfg, 2) == 32 * 8 * 108
    assert slot_pool_bytes(FP16_CELL, cfg, slots) == (slots + 1) * 128 * FP16_CELL  # + scratch
    assert tokens / fp16_tokens >= 4.4  # 4.74x before the slot pool
    assert tokens / fp16_tokens < 512 / 108


def test_pool_reports_the_bytes_it_allocated():
    cfg = get_preset("k4v2_g64", head_dim=64)
    pool = KVarNTokenToKVPool(
        64 * 10, 64, torch.float16, 2, 64, 3, "cpu", False, kvarn_config=cfg, num_slots=5
    )
    packed = 3 * 11 * 2 * cfg.page_bytes  # layers x (pages + padding page) x heads x record
    slots = 2 * 3 * (5 + 1) * 64 * 2 * 64 * 2  # K, V x layers x (slots + scratch) x G x H x D
    tables = 11 * 8 + 11 * 4 + 5 * 8  # page_slot int64, commit counters int32, free-slot stack
    assert sum(pool.get_kv_size_bytes()) == packed + slots + tables
    assert pool.store.nbytes == packed + slots + tables


if __name__ == "__main__":
    test_llama3_8b_holds_4_4x_the_tokens_of_fp16_in_40gb_with_64_running_requests()
