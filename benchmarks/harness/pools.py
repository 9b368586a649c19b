"""How many tokens each KV pool holds in a GPU memory budget, for a model shape (bytes only).

Bytes per token over all layers and KV heads (L layers, H KV heads, head_dim D; K and V):

=============  ==========================================================================
``fp16``       ``L * H * 2 * D * 2`` (SGLang's ``cell_size``); ``fp16-p1``: page size 1
               (what fp16 users run: token-granular prefix matches), ``fp16-p128``: 128
``fp8``        ``L * H * 2 * D`` (``--kv-cache-dtype fp8_e4m3``: one byte per element, a
               per-tensor scale); ``fp8-p1`` and ``fp8-p128`` likewise
``int8``       ``L * H * 264`` at D = 128: int8 codes plus an fp16 scale and an fp16 zero
               point per token, per KV head, for K and for V (``baselines.get_method("int8")``).
               SGLang 0.5.23 as installed has no int8 KV cache (its ``--kv-cache-dtype``
               choices are auto, fp8_e5m2, fp8_e4m3, mxfp8, bf16, nvfp4, fp4_mx_block16); the
               upstream INT8 KV path (#22004) runs with page size 1 and the radix cache
               disabled, and so does this pool.
KVarN preset   packed pages, ``kvarn_sglang.serving.capacity``: ``token_capacity`` after the fp16
               slot pool (``default_num_slots(max_running, sink_pages)`` unless given) is
               paid, exactly what the plugin gives SGLang.
=============  ==========================================================================

Capacities are whole pages, ``budget // bytes`` (the budget is never allocated here).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kvarn_sglang.format.config import PRESETS, KVarNConfig, get_preset
from kvarn_sglang.quant.baselines import get_method
from kvarn_sglang.serving.capacity import default_num_slots, kvarn_cell_bytes, token_capacity

DENSE = ("fp16", "fp8", "int8")


@dataclass(frozen=True)
class ModelShape:
    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128

    @property
    def fp16_cell(self) -> int:
        """fp16 bytes of one token over all layers and KV heads, K and V."""
        return self.layers * self.kv_heads * 2 * self.head_dim * 2


@dataclass(frozen=True)
class PoolSpec:
    """One pool in a budget.

    Attributes:
        cell_bytes: bytes per token over all layers and KV heads (packed pages for KVarN).
        token_capacity: tokens the allocator manages (whole pages).
        num_slots, slot_bytes: KVarN's fp16 page slots and the bytes of one (all layers).
        config: the KVarN config (None for dense pools).
    """

    name: str
    page_size: int
    radix: bool
    cell_bytes: int
    token_capacity: int
    num_slots: int = 0
    slot_bytes: int = 0
    config: KVarNConfig | None = None


def make_pool(
    name: str,
    shape: ModelShape,
    budget_bytes: int,
    max_running: int,
    *,
    page_size: int = 128,
    kvarn_slots: int | None = None,
    sinkhorn_iters: int | None = None,
) -> PoolSpec:
    """The pool ``name`` (``fp16``, ``fp8``, ``int8`` or a KVarN preset; a dense pool may end
    in ``-pN``, page size N) for ``shape`` in ``budget_bytes``. ``sinkhorn_iters`` overrides
    the preset's (same bytes, cheaper on CPU)."""
    if budget_bytes <= 0:
        raise ValueError(f"Invalid budget_bytes {budget_bytes}: expected > 0")
    base, _, suffix = name.partition("-p")
    if suffix.isdigit() and base in DENSE:
        return replace(make_pool(base, shape, budget_bytes, max_running, page_size=int(suffix)),
                       name=name)  # fmt: skip
    heads = shape.layers * shape.kv_heads
    if name in PRESETS:
        cfg = get_preset(name, head_dim=shape.head_dim)
        if sinkhorn_iters is not None:
            cfg = replace(cfg, sinkhorn_iters=sinkhorn_iters)
        slots = kvarn_slots or default_num_slots(max_running, cfg.sink_pages)
        return PoolSpec(
            name=name,
            page_size=cfg.page_size,
            radix=True,
            cell_bytes=kvarn_cell_bytes(shape.fp16_cell, cfg, 2),
            token_capacity=token_capacity(budget_bytes, shape.fp16_cell, cfg, 2, slots),
            num_slots=slots,
            slot_bytes=cfg.page_size * shape.fp16_cell,
            config=cfg,
        )
    if name == "fp16":
        cell, ps = shape.fp16_cell, page_size
    elif name == "fp8":
        cell, ps = shape.fp16_cell // 2, page_size
    elif name == "int8":
        per_head = get_method("int8", head_dim=shape.head_dim, page_size=128).layout.page_bytes
        cell, ps = heads * per_head // 128, 1
    else:
        raise ValueError(f"Unknown pool {name!r}: expected one of {DENSE} or {sorted(PRESETS)}")
    return PoolSpec(name, ps, name != "int8", cell, budget_bytes // cell // ps * ps)
