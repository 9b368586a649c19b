"""KVarN and the KV-cache quantizers it is compared with, behind one page interface.

Every method stores whole pages as real byte records (``uint8 [num_pages, num_kv_heads,
page_bytes]``), so bytes per token are what a pool would allocate, metadata included:

==================  ==========================================================================
``fp16``            the 16-bit cache (no quantization)
``fp8``             float8 e4m3 with one per-tensor scale, as SGLang's ``--kv-cache-dtype
                    fp8_e4m3`` (scale 1.0 unless a checkpoint provides one)
``int8``, ``int4``  asymmetric per token per head (SGLang's INT8 KV, LMDeploy style)
``kivi2/4``         KIVI: K per channel over the page's tokens, V per token, no rotation
``hadamard2/4``     QuaRot style: Hadamard rotation, then per-token RTN for K and V
``kvarn-norot-kXvY``   ablation: KVarN without the rotation
``kvarn-nonorm-kXvY``  ablation: rotation + KIVI axes, no variance normalization
``k4v2_g128`` ...   the KVarN presets of ``kvarn_sglang.format.config.PRESETS``
==================  ==========================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch

from kvarn_sglang.format.config import PRESETS, get_preset
from kvarn_sglang.format.layout import PageLayout, tile_layout
from kvarn_sglang.format.numerics import check_pages
from kvarn_sglang.quant.reference import (
    dequantize_pages,
    dequantize_tile_pages,
    quantize_pages,
    quantize_tile_pages,
)

FP8_MAX = 448.0


class PageMethod:
    """A KV quantizer over whole pages. Subclasses set ``name``, bits and ``layout``.

    Attributes:
        name: registry name (``get_method(name)`` builds it).
        recent_pages: pages before a query's own page also read unquantized (0 for every
            method here; a recent-window variant sets it).
        k_bits, v_bits: nominal code widths (16 for fp16, 8 for fp8).
        page_size, head_dim: G and D of the pages it takes.
    """

    name: str
    k_bits: int
    v_bits: int
    page_size: int
    head_dim: int
    recent_pages: int = 0  # pages before a query's own page that it also reads unquantized

    @cached_property
    def layout(self) -> PageLayout:
        raise NotImplementedError

    def for_layer(self, layer: int) -> PageMethod:
        """The method that stores layer ``layer`` (itself, unless it allocates per layer)."""
        return self

    def quantize_pages(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """K, V ``[P, G, H, D]`` float -> records ``uint8 [P, H, page_bytes]``."""
        check_pages("k", k, self.page_size, self.head_dim)
        check_pages("v", v, self.page_size, self.head_dim)
        if k.shape != v.shape:
            raise ValueError(f"Invalid shape of v: expected {list(k.shape)}, got {list(v.shape)}")
        return self._quantize(k, v)

    def dequantize_pages(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Records ``uint8 [P, H, page_bytes]`` -> K, V ``fp32 [P, G, H, D]`` (model domain)."""
        if records.dim() != 3 or records.shape[2] != self.layout.page_bytes:
            raise ValueError(
                f"Invalid shape of records: expected [num_pages, num_kv_heads, "
                f"{self.layout.page_bytes}], got {list(records.shape)}"
            )
        return self._dequantize(records)

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dequantize(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class KVarNMethod(PageMethod):
    """KVarN as specified by ``kvarn_sglang.quant.reference`` for one config."""

    def __init__(self, name: str, head_dim: int, **overrides) -> None:
        self.config = get_preset(name, head_dim=head_dim, **overrides)
        self.name, self.k_bits, self.v_bits = name, self.config.k_bits, self.config.v_bits
        self.page_size, self.head_dim = self.config.page_size, head_dim

    @cached_property
    def layout(self) -> PageLayout:
        return self.config.layout

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return quantize_pages(k, v, self.config)

    def _dequantize(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantize_pages(records, self.config)


@dataclass
class TileMethod(PageMethod):
    """A low-bit tile method: optional rotation, optional variance normalization, RTN."""

    name: str
    k_bits: int
    v_bits: int
    page_size: int
    head_dim: int
    rotated: bool
    k_per_channel: bool
    sinkhorn_iters: int | None = None  # None: no variance normalization

    @cached_property
    def layout(self) -> PageLayout:
        return tile_layout(
            page_size=self.page_size,
            head_dim=self.head_dim,
            k_bits=self.k_bits,
            v_bits=self.v_bits,
            k_per_channel=self.k_per_channel,
            normalized=self.sinkhorn_iters is not None,
        )

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return quantize_tile_pages(
            k,
            v,
            self.layout,
            k_bits=self.k_bits,
            v_bits=self.v_bits,
            rotated=self.rotated,
            k_per_channel=self.k_per_channel,
            sinkhorn_iters=self.sinkhorn_iters,
        )

    def _dequantize(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantize_tile_pages(
            records, self.layout, rotated=self.rotated, k_per_channel=self.k_per_channel
        )


@dataclass
class FloatMethod(PageMethod):
    """Pages stored element by element as fp16, or as fp8 e4m3 times a per-tensor scale."""

    name: str
    page_size: int
    head_dim: int
    fp8_scale: float | None = None  # None: fp16

    @property
    def k_bits(self) -> int:  # type: ignore[override]
        return 16 if self.fp8_scale is None else 8

    @property
    def v_bits(self) -> int:  # type: ignore[override]
        return self.k_bits

    @cached_property
    def layout(self) -> PageLayout:
        dtype = torch.float16 if self.fp8_scale is None else torch.uint8
        shape = (self.page_size, self.head_dim)
        return PageLayout.build([("k", dtype, shape), ("v", dtype, shape)], *shape)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 1, 3).float()  # [P, H, G, D]
        if self.fp8_scale is None:
            return x.half()
        x = (x / self.fp8_scale).clamp(-FP8_MAX, FP8_MAX)
        return x.to(torch.float8_e4m3fn).view(torch.uint8)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_scale is not None:
            x = x.view(torch.float8_e4m3fn).float() * self.fp8_scale
        return x.float().permute(0, 2, 1, 3)

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.layout.pack({"k": self._encode(k), "v": self._encode(v)})

    def _dequantize(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.layout.unpack(records)
        return self._decode(parts["k"]), self._decode(parts["v"])


_BITS = r"k([248])v([248])"
DEFAULT_METHODS = (
    "fp16",
    "fp8",
    "int8",
    "int4",
    "kivi4",
    "hadamard4",
    "k4v4_g128",
    "k4v2_g128",
    "kivi2",
    "hadamard2",
    "k2v2_g128",
    "kvarn-norot-k2v2",
    "kvarn-nonorm-k2v2",
)


def get_method(name: str, *, head_dim: int = 128, page_size: int = 128) -> PageMethod:
    """Build the method called ``name`` (see the module docstring) for pages of G x D.

    A KVarN preset brings its own page size; every other method uses ``page_size``.
    """
    if name in PRESETS:
        return KVarNMethod(name, head_dim)
    g, d = page_size, head_dim
    if name == "fp16":
        return FloatMethod(name, g, d)
    if name == "fp8":
        return FloatMethod(name, g, d, fp8_scale=1.0)
    if m := re.fullmatch(r"int([48])", name):
        bits = int(m[1])
        return TileMethod(name, bits, bits, g, d, rotated=False, k_per_channel=False)
    if m := re.fullmatch(r"(kivi|hadamard)([24])", name):
        bits, kivi = int(m[2]), m[1] == "kivi"
        return TileMethod(name, bits, bits, g, d, rotated=not kivi, k_per_channel=kivi)
    if m := re.fullmatch(r"kvarn-(norot|nonorm)-" + _BITS, name):
        kb, vb, norot = int(m[2]), int(m[3]), m[1] == "norot"
        iters = get_preset().sinkhorn_iters if norot else None
        return TileMethod(name, kb, vb, g, d, not norot, True, sinkhorn_iters=iters)
    raise ValueError(
        f"Unknown method {name!r}: expected fp16, fp8, int8, int4, kivi2, kivi4, hadamard2, "
        f"hadamard4, kvarn-norot-kXvY, kvarn-nonorm-kXvY or a KVarN preset {sorted(PRESETS)}"
    )
