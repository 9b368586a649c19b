"""kvarn-sglang: the KVarN low-bit KV cache for SGLang's radix cache.

Four layers, each importing only the ones above it in this list:

* ``format``: presets (``KVarNConfig``), the packed page record's bytes, and the numbers
  every implementation shares (clip bounds, the Hadamard matrix, the page checks). The Triton
  kernels (``kvarn_sglang.kernels``) build on this layer alone.
* ``quant``: the executable spec in plain torch (``reference``: quantizer and decode-
  consistent attention), round-to-nearest and its refits, the beyond-the-paper variants and
  the baseline quantizers compared against.
* ``serving``: the SGLang integration: settings, the KV pool, its allocator, the page
  store, a page's life (``pages``), the per-pass plan and the attention backend. The hooks
  into SGLang itself and the plugin entry point that installs them live above it, in
  ``kvarn_sglang.patches``.
* ``eval``: the ``kvarn-sglang`` command: ``eval`` (accuracy of KVarN on your model),
  ``quant-error``, ``presets`` and ``export-hf``.

``format``, ``quant`` and ``eval`` import without SGLang.
"""

from kvarn_sglang.format.config import DEFAULT_PRESET, PRESETS, KVarNConfig, get_preset

__all__ = ["DEFAULT_PRESET", "PRESETS", "KVarNConfig", "get_preset"]
__version__ = "0.1.0"
