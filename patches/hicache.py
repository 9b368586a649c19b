"""Hook on ``sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.init_hicache``
(sglang==0.5.23): with ``--kv-cache kvarn --enable-hierarchical-cache`` the host tier is
KVarN's (``kvarn_sglang.serving.hicache``).

SGLang picks the builder of the HiCache stack by asking every registered ``StackStrategy`` of
``mem_cache/hybrid_cache/hybrid_pool_assembler.py`` in turn whether it matches the device pool.
Before the tree builds its stack (BEFORE ``init_hicache``, in the scheduler process that owns
the KVarN pool), this hook registers ``KVarNStackStrategy`` ahead of SGLang's own strategies
through SGLang's ``register_stack_strategy``, once per process. It matches KVarN pools only, so
other pools keep SGLang's strategies.
"""

from __future__ import annotations

INIT_HICACHE = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.init_hicache"


def before_init_hicache(self, server_args, params, *args, **kwargs):
    from kvarn_sglang.serving.pool import KVarNTokenToKVPool

    if not isinstance(params.token_to_kv_pool_allocator.get_kvcache(), KVarNTokenToKVPool):
        return
    from sglang.srt.mem_cache.hybrid_cache import hybrid_pool_assembler as assembler

    from kvarn_sglang.serving.hicache import KVarNStackStrategy

    if not any(isinstance(s, KVarNStackStrategy) for s in assembler._STRATEGIES):
        assembler.register_stack_strategy(KVarNStackStrategy())
