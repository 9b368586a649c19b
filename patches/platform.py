"""Hooks on ``sglang.srt.platforms.interface.SRTPlatform`` (sglang==0.5.23): with
``--kv-cache kvarn`` the KV pool class is ``KVarNTokenToKVPool`` and the paged allocator is
``KVarNPagedAllocator`` (which releases fp16 slots of freed pages)."""

from __future__ import annotations

from kvarn_sglang.serving.settings import active_settings

GET_KV_POOL_CLS = "sglang.srt.platforms.interface.SRTPlatform.get_kv_pool_cls"
GET_PAGED_ALLOCATOR_CLS = "sglang.srt.platforms.interface.SRTPlatform.get_paged_allocator_cls"


def after_get_kv_pool_cls(result, self, *args, **kwargs):
    settings = active_settings()
    kind = kwargs.get("kind", args[0] if args else None)
    if settings is None:
        return result
    if kind != "mha":
        # SGLang resolves the class of every pool kind before it picks one; MLA/DSA models
        # were already refused at startup (``server_args.refuse_model``).
        return result
    from kvarn_sglang.serving.pool import KVarNTokenToKVPool

    return KVarNTokenToKVPool


def after_get_paged_allocator_cls(result, self, *args, **kwargs):
    if active_settings() is None:
        return result
    from kvarn_sglang.serving.allocator import KVarNPagedAllocator

    return KVarNPagedAllocator
