"""Hook on ``sglang.srt.mem_cache.kv_cache_dtype.configure_kv_cache_dtype`` (sglang==0.5.23).

SGLang rejects unknown ``--kv-cache-dtype`` strings here. For ``kvarn`` it returns the
string itself and the dtype of the fp16 slot pool and attention inputs: the model's dtype
when it is fp16 or bf16, else fp16; first it checks that every KVarN hook was applied in
this process (``kvarn_sglang.patches.plugin.require_hooks``).
"""

from __future__ import annotations

import torch

from kvarn_sglang.serving.settings import KV_CACHE_CHOICE

CONFIGURE_KV_CACHE_DTYPE = "sglang.srt.mem_cache.kv_cache_dtype.configure_kv_cache_dtype"


def around_configure_kv_cache_dtype(original, **kwargs):
    if kwargs.get("server_args_kv_cache_dtype") != KV_CACHE_CHOICE:
        return original(**kwargs)
    from kvarn_sglang.patches.plugin import require_hooks

    require_hooks()  # the scheduler process's first KVarN step
    model_dtype = kwargs.get("model_dtype")
    dtype = model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16
    return KV_CACHE_CHOICE, dtype
