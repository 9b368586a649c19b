"""The test-only answer to a device call SGLang makes while it builds some models on a CPU.

``torch.get_device_module()`` without an argument returns ``torch.cuda`` in a CUDA build of
torch even on a machine without a GPU, so ``...current_device()`` (``models/qwen3_next.py``,
Gated DeltaNet's gated RMSNorm) fails there. In a server process of the CPU test stand-in
(``tests/cpu_engine``: no GPU), the current device module is ``torch.cpu``.
"""

from __future__ import annotations

import functools

import torch

_get_device_module = torch.get_device_module


# ``wraps`` keeps ``__wrapped__``, through which torch.compile's tracer finds its handler for
# ``torch.get_device_module`` (SGLang compiles its rotary embedding on a CPU).
@functools.wraps(_get_device_module)
def get_device_module(device=None):
    """``torch.get_device_module``, answering ``torch.cpu`` for the current device when no
    GPU is available."""
    if device is None and not torch.cuda.is_available():
        return torch.cpu
    return _get_device_module(device)


torch.get_device_module = get_device_module
