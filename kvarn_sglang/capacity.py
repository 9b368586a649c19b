"""How many tokens a memory budget holds with KVarN pages, every fp16 byte counted.

SGLang sizes its pool as ``budget // cell_size`` with ``cell_size`` the fp16 bytes of one
token over all layers and KV heads. With KVarN a token costs ``page_bytes / G`` per layer and
KV head, and the fp16 slot pool (sink pages and filling pages of running requests) is a
fixed cost taken off the budget first.
"""

from __future__ import annotations

from kvarn_sglang.config import KVarNConfig


def default_num_slots(max_running_requests: int, sink_pages: int) -> int:
    """fp16 page slots: each running request holds its sink pages and its filling page
    between passes; a small headroom holds sink pages of cached prefixes."""
    return max_running_requests * (sink_pages + 1) + max(8, max_running_requests // 8)


def kvarn_cell_bytes(fp16_cell_bytes: int, config: KVarNConfig, elem_bytes: int) -> int:
    """Bytes per token (all layers and KV heads) of packed pages, from SGLang's fp16 cell."""
    heads_x_layers = fp16_cell_bytes // (2 * config.head_dim * elem_bytes)
    return -(-heads_x_layers * config.page_bytes // config.page_size)


def slot_pool_bytes(fp16_cell_bytes: int, config: KVarNConfig, num_slots: int) -> int:
    """Bytes of ``num_slots`` fp16 pages plus the scratch page (padding writes land there)
    over all layers and KV heads."""
    return (num_slots + 1) * config.page_size * fp16_cell_bytes


def token_capacity(
    budget_bytes: int, fp16_cell_bytes: int, config: KVarNConfig, elem_bytes: int, num_slots: int
) -> int:
    """Tokens of packed pages that fit once the slot pool is paid for (whole pages)."""
    left = budget_bytes - slot_pool_bytes(fp16_cell_bytes, config, num_slots)
    tokens = max(0, left) // kvarn_cell_bytes(fp16_cell_bytes, config, elem_bytes)
    return tokens // config.page_size * config.page_size
