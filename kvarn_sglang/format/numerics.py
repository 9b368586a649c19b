"""The numbers every implementation of KVarN shares, and the paged store they all read.

The torch reference (``kvarn_sglang.quant``), the Triton kernels (``kvarn_sglang.kernels``)
and the baselines import these from here, so the kernels depend on the format, never on the
reference: the variance normalization's clip bounds (``LOG_*`` for the log scales, ``STD_*``
for the measured standard deviations), the smallest RTN step, the largest value a page holds,
the Hadamard rotation, the
check every quantizer applies to its input pages, and ``PagedKVCache``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG_MIN, LOG_MAX = -0.3, 10.0
STD_MIN, STD_MAX = 1e-3, 1e3
SCALE_MIN = 1e-10  # smallest RTN step: a constant row quantizes to its zero point
# The largest rotated value a page record can reconstruct, (code * scale + zero) * norm with
# codes below 16 and fp16 metadata: a token whose L2 norm exceeds it times sqrt(head_dim) has a
# rotated element beyond it (the rotation keeps the norm), so no page's scales can hold it.
PAGE_VALUE_MAX = 16 * 65504.0**2


# ----------------------------------------------------------------------------- rotation
@lru_cache(maxsize=32)
def _hadamard(d: int, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(device)


def hadamard_matrix(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix ``fp32 [d, d]``: symmetric, orthonormal, H @ H = I.
    Cached per device: treat the result as read-only."""
    if d <= 0 or d & (d - 1):
        raise ValueError(f"Unsupported head_dim {d}: the Hadamard rotation needs a power of two")
    return _hadamard(d, torch.device(device))


def check_pages(name: str, x: torch.Tensor, page_size: int, head_dim: int) -> None:
    """Raise ``TypeError``/``ValueError`` unless x is ``float [num_pages, G, H, D]`` and finite."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"Unsupported dtype of {name}: expected float16, bfloat16 or float32, got {x.dtype}"
        )
    if x.dim() != 4 or x.shape[1] != page_size or x.shape[3] != head_dim:
        raise ValueError(
            f"Invalid shape of {name}: expected [num_pages, {page_size}, num_kv_heads, "
            f"{head_dim}], got {list(x.shape)}"
        )
    finite = torch.isfinite(x).all(dim=3).all(dim=1)  # [num_pages, H]
    if not finite.all():
        page, head = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(
            f"Non-finite values in {name}: page {page}, kv head {head} contains NaN or Inf; "
            f"no page was quantized"
        )


@dataclass
class PagedKVCache:
    """A reference paged store: packed records plus fp16 slots.

    Attributes:
        packed: ``uint8 [num_pages, Hkv, page_bytes]``, committed pages by page id.
        slot_k, slot_v: ``[num_slots, G, Hkv, D]`` fp16 pages (sinks, filling pages).
        page_slot: ``int64 [num_pages]``, the fp16 slot of a page or -1.

    The torch reference reads it with ``kvarn_sglang.quant.reference.read_pages``; the
    kernels read it directly.
    """

    packed: torch.Tensor
    slot_k: torch.Tensor
    slot_v: torch.Tensor
    page_slot: torch.Tensor
