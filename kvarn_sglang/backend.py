"""``KVarNAttnBackend``: SGLang attention over a ``KVarNTokenToKVPool``.

Per forward pass, ``init_forward_metadata`` plans the pages (``forward_plan``) and gives every
page that receives tokens an fp16 slot. Per layer, ``forward_extend``/``forward_decode``

1. write the new K/V into fp16 slots (``set_kv_buffer``);
2. commit the pages completed in this pass (quantize once, per layer), so later tokens of
   the same pass read them quantized, as decode-consistent semantics require;
3. run attention: the Triton kernels on CUDA, the torch reference elsewhere (the same
   semantics; the kernels are tested against it);
4. after the last layer, release the slots of the committed pages.

CUDA graphs are not supported yet: the plugin refuses to start with them enabled.
"""

from __future__ import annotations

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from kvarn_sglang.forward_plan import ForwardPlan, build_plan
from kvarn_sglang.pool import KVarNTokenToKVPool
from kvarn_sglang.reference import ref_decode_attention, ref_extend_attention


class KVarNAttnBackend(AttentionBackend):
    """Decode-consistent attention over packed KVarN pages (see the module docstring)."""

    def __init__(self, model_runner) -> None:
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, KVarNTokenToKVPool):
            raise ValueError(
                f"Unsupported KV pool {type(pool).__name__}: --attention-backend kvarn needs "
                f"--kv-cache kvarn"
            )
        self.pool = pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.config = pool.kvarn_config
        self.plan: ForwardPlan | None = None

    def init_forward_metadata(self, forward_batch) -> None:
        seq = [int(x) for x in forward_batch.seq_lens_cpu.tolist()]
        if forward_batch.forward_mode.is_decode():
            prefix = [s - 1 for s in seq]
        else:
            prefix = [int(x) for x in forward_batch.extend_prefix_lens_cpu]
        self.plan = build_plan(
            self.req_to_token,
            forward_batch.req_pool_indices,
            prefix,
            seq,
            self.config.page_size,
            self.config.sink_pages,
        )
        self.pool.store.take_slots(self.plan.slot_pages)

    def _write_and_commit(self, k, v, layer, forward_batch, save_kv_cache: bool) -> int:
        if not save_kv_cache:
            raise ValueError("KVarN needs every K/V write through the pool (save_kv_cache=True)")
        self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
        local = layer.layer_id - self.pool.start_layer
        store, plan = self.pool.store, self.plan
        store.commit_slots(local, plan.slot_commits)
        rows = plan.direct_rows
        store.commit(local, plan.direct_pages, k[rows], v[rows])
        return local

    def _finish_layer(self, layer) -> None:
        if layer.layer_id == self.pool.end_layer:
            self.pool.store.release_slots(self.plan.slot_commits)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kw):
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        k, v = k.view(-1, hkv, d), v.view(-1, hkv, d)
        local = self._write_and_commit(k, v, layer, forward_batch, save_kv_cache)
        slot_dtype = self.pool.store.slot_k[local].dtype
        args = (
            q.view(-1, hq, d),
            k.to(slot_dtype),
            v.to(slot_dtype),
            self.pool.store.view(local),
            self.plan.page_table,
            self.plan.prefix_lens,
            self.plan.extend_lens,
            self.config,
            layer.scaling,
        )
        if q.is_cuda:
            from kvarn_sglang.kernels.extend import extend_attention

            out = extend_attention(*args)
        else:
            out = ref_extend_attention(*args)
        self._finish_layer(layer)
        return out.to(q.dtype).reshape(-1, hq * d)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kw):
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        local = self._write_and_commit(
            k.view(-1, hkv, d), v.view(-1, hkv, d), layer, forward_batch, save_kv_cache
        )
        args = (
            q.view(-1, hq, d),
            self.pool.store.view(local),
            self.plan.page_table,
            self.plan.seq_lens,
            self.config,
            layer.scaling,
        )
        if q.is_cuda:
            from kvarn_sglang.kernels.decode import decode_attention

            out = decode_attention(*args)
        else:
            out = ref_decode_attention(*args)
        self._finish_layer(layer)
        return out.to(q.dtype).reshape(-1, hq * d)


def create_kvarn_backend(model_runner) -> KVarNAttnBackend:
    """Factory registered with SGLang's ``register_attention_backend("kvarn")``."""
    return KVarNAttnBackend(model_runner)
