"""kvarn-sglang: the KVarN low-bit KV cache for SGLang's radix cache.

Core modules import without SGLang: ``config`` (presets), ``layout`` (page bytes),
``reference`` (the executable spec), ``baselines`` (other KV quantizers on the same pages).
"""

from kvarn_sglang.config import DEFAULT_PRESET, PRESETS, KVarNConfig, get_preset

__all__ = ["DEFAULT_PRESET", "PRESETS", "KVarNConfig", "get_preset"]
__version__ = "0.1.0"
