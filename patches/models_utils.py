"""Hook on ``sglang.srt.models.utils.enable_fused_set_kv_buffer`` (sglang==0.5.23): the fused
RoPE-writes-KV path writes straight into dense K/V buffers, bypassing the pool; with KVarN
it is always off so every K/V goes through ``set_kv_buffer``."""

from __future__ import annotations

from kvarn_sglang.serving.settings import active_settings

ENABLE_FUSED_SET_KV_BUFFER = "sglang.srt.models.utils.enable_fused_set_kv_buffer"


def around_enable_fused_set_kv_buffer(original, *args, **kwargs):
    if active_settings() is not None:
        return False
    return original(*args, **kwargs)
