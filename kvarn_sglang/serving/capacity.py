"""How many tokens a memory budget holds with KVarN pages, every fp16 byte counted, and how
many fp16 page slots a server needs.

SGLang sizes its pool as ``budget // cell_size`` with ``cell_size`` the fp16 bytes of one
token over all layers and KV heads. With KVarN a token costs ``page_bytes / G`` per layer and
KV head, and the fp16 slot pool (sink pages and filling pages) is a fixed cost taken off the
budget first.

Slots are sized from need, not from the worst case. Admission is slot-aware
(``kvarn_sglang.serving.slot_budget``): a request is admitted only if its slots will exist, so fewer
slots never crash a server, they only make requests wait. What a server needs at once:

* one filling page per running request (SGLang's ``ReqToTokenPool`` has exactly
  ``--max-running-requests`` rows that can hold KV; row 0 is padding that only CUDA-graph
  padded rows read, and those read the scratch slot);
* the sink pages of the distinct prefixes in use: requests that share a cached first page
  share its sink slot, so an agent's system prompt costs one sink for all its branches;
* cached prefixes nobody runs keep their sink slot until slot-aware eviction needs it.

The default keeps ``max(16, running // 8)`` distinct sinks beside the running requests; on a
PD decode server, whose requests share no cached prefix, every running request its own.
"""

from __future__ import annotations

from kvarn_sglang.format.config import KVarNConfig


def default_distinct_sinks(max_running_requests: int) -> int:
    """Distinct sink prefixes (running or cached) the default slot pool holds at once."""
    return max(16, max_running_requests // 8)


def default_num_slots(max_running_requests: int, sink_pages: int) -> int:
    """fp16 page slots by default: a filling page per running request plus the sink pages of
    ``default_distinct_sinks`` distinct prefixes."""
    return max_running_requests + sink_pages * default_distinct_sinks(max_running_requests)


def decode_num_slots(max_running_requests: int, sink_pages: int) -> int:
    """fp16 page slots by default on a PD decode server: its requests arrive from a prefill
    server with their own sink pages (it keeps no prefix cache), so each running request
    holds its sink pages and a filling page."""
    return max_running_requests * (sink_pages + 1)


def min_num_slots(max_running_requests: int, sink_pages: int) -> int:
    """The fewest slots that let ``max_running_requests`` requests run at once: a filling page
    each, and the sink pages of one prefix they all share; and never fewer than a lone request
    prefilled in chunks needs (its sink pages and two filling pages, ``pages.filling_slots``).
    While one of them is prefilled in chunks, one fewer runs beside it at this minimum."""
    return max(max_running_requests, 2) + sink_pages


def kvarn_cell_bytes(fp16_cell_bytes: int, config: KVarNConfig, elem_bytes: int) -> int:
    """Bytes per token (all layers and KV heads) of packed pages, from SGLang's fp16 cell."""
    heads_x_layers = fp16_cell_bytes // (2 * config.head_dim * elem_bytes)
    return -(-heads_x_layers * config.page_bytes // config.page_size)


def slot_pool_bytes(fp16_cell_bytes: int, config: KVarNConfig, num_slots: int) -> int:
    """Bytes of ``num_slots`` fp16 pages plus the scratch page (padding writes land there)
    over all layers and KV heads."""
    return (num_slots + 1) * config.page_size * fp16_cell_bytes


def slot_pool_tokens(
    fp16_cell_bytes: int, config: KVarNConfig, elem_bytes: int, num_slots: int
) -> int:
    """Packed tokens the slot pool's bytes would hold instead (what the slots cost)."""
    slots = slot_pool_bytes(fp16_cell_bytes, config, num_slots)
    return slots // kvarn_cell_bytes(fp16_cell_bytes, config, elem_bytes)


def token_capacity(
    budget_bytes: int, fp16_cell_bytes: int, config: KVarNConfig, elem_bytes: int, num_slots: int
) -> int:
    """Tokens of packed pages that fit once the slot pool is paid for (whole pages)."""
    left = budget_bytes - slot_pool_bytes(fp16_cell_bytes, config, num_slots)
    tokens = max(0, left) // kvarn_cell_bytes(fp16_cell_bytes, config, elem_bytes)
    return tokens // config.page_size * config.page_size
