"""KVarN configuration, validated once, and the named presets.

A preset name reads ``k{K bits}v{V bits}_g{tile size}``: ``k4v2_g128`` stores K at 4 bits per
channel and V at 2 bits per token in tiles of 128 tokens (one SGLang page = one tile). A
``_plus`` preset (``k2v2_g128_plus``) stores the same records but chooses them better at
commit time (``refit_iters=4`` least-squares refits of every row's scale and zero point that
clip no element); decoding is unchanged. The plain presets are the paper's method.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from kvarn_sglang.format.layout import PageLayout, tile_layout

SUPPORTED_BITS = (2, 4)
SUPPORTED_PAGE_SIZES = (64, 128)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
DEFAULT_PRESET = "k4v2_g128"
MAX_REFIT_ITERS = 8
PLUS_REFIT_ITERS = 4


@dataclass(frozen=True)
class KVarNConfig:
    """How KVarN quantizes one KV head's pages.

    Attributes:
        k_bits: bits per K code (2 or 4); K is quantized per channel over the tile's tokens.
        v_bits: bits per V code (2 or 4); V is quantized per token over the channels.
        page_size: tokens per tile G (64 or 128); equals SGLang's ``--page-size``.
        head_dim: channels per KV head D (64, 128 or 256; a power of two for the Hadamard).
        sinkhorn_iters: variance-normalization iterations (0 keeps the format, norm of ones).
        sink_pages: leading pages of every sequence kept in fp16 (attention sinks).
        clip_quantile: if > 0, the RTN range of a row is [q(p), q(1-p)] instead of [min, max].
        refit_iters: least-squares refits of each row's scale/zero after RTN, each kept only
            where it lowers the error and clips nothing (0: the paper; ``_plus``: 4). Commit
            time only: the stored format is unchanged.
    """

    k_bits: int = 4
    v_bits: int = 2
    page_size: int = 128
    head_dim: int = 128
    sinkhorn_iters: int = 8
    sink_pages: int = 1
    clip_quantile: float = 0.0
    refit_iters: int = 0

    def __post_init__(self) -> None:
        for name in ("k_bits", "v_bits"):
            bits = getattr(self, name)
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"Unsupported {name} {bits}: KVarN supports {SUPPORTED_BITS}")
        if self.page_size not in SUPPORTED_PAGE_SIZES:
            raise ValueError(
                f"Unsupported page_size {self.page_size}: KVarN tiles are "
                f"{SUPPORTED_PAGE_SIZES} tokens (set --page-size to the preset's G)"
            )
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"Unsupported head_dim {self.head_dim}: KVarN needs a power of two in "
                f"{{64, 128, 256}}"
            )
        if not 0 <= self.sinkhorn_iters <= 64:
            raise ValueError(f"Unsupported sinkhorn_iters {self.sinkhorn_iters}: expected 0..64")
        if self.sink_pages < 0:
            raise ValueError(f"Unsupported sink_pages {self.sink_pages}: expected >= 0")
        if not 0.0 <= self.clip_quantile < 0.5:
            raise ValueError(
                f"Unsupported clip_quantile {self.clip_quantile}: expected 0 <= p < 0.5"
            )
        if not 0 <= self.refit_iters <= MAX_REFIT_ITERS:
            raise ValueError(
                f"Unsupported refit_iters {self.refit_iters}: expected 0..{MAX_REFIT_ITERS}"
            )
        if self.refit_iters and self.clip_quantile:
            raise ValueError(
                f"Unsupported refit_iters {self.refit_iters} with clip_quantile "
                f"{self.clip_quantile}: refits start from the min/max range"
            )

    @property
    def name(self) -> str:
        n = self.refit_iters
        refit = {0: "", PLUS_REFIT_ITERS: "_plus"}.get(n, f"_refit{n}")
        return f"k{self.k_bits}v{self.v_bits}_g{self.page_size}{refit}"

    @cached_property
    def layout(self) -> PageLayout:
        """Byte layout of one packed page of one KV head (see ``kvarn_sglang.format.layout``)."""
        return tile_layout(
            page_size=self.page_size,
            head_dim=self.head_dim,
            k_bits=self.k_bits,
            v_bits=self.v_bits,
            k_per_channel=True,
            normalized=True,
            planar=True,
        )

    @property
    def page_bytes(self) -> int:
        """Bytes of one packed page of one KV head."""
        return self.layout.page_bytes

    @property
    def bytes_per_token(self) -> float:
        """Packed bytes per token per KV head, K and V together."""
        return self.layout.bytes_per_token

    @property
    def compression(self) -> float:
        """Size ratio of a 16-bit page to a packed page."""
        return self.layout.compression

    def with_head_dim(self, head_dim: int) -> KVarNConfig:
        return replace(self, head_dim=head_dim)


PRESETS: dict[str, KVarNConfig] = {
    cfg.name: cfg
    for cfg in (
        KVarNConfig(k_bits=4, v_bits=2, page_size=128),
        KVarNConfig(k_bits=4, v_bits=4, page_size=128),
        KVarNConfig(k_bits=4, v_bits=2, page_size=64),
        KVarNConfig(k_bits=4, v_bits=4, page_size=64),
        KVarNConfig(k_bits=2, v_bits=2, page_size=128),
        KVarNConfig(k_bits=2, v_bits=4, page_size=128),
        KVarNConfig(k_bits=2, v_bits=2, page_size=64),
        KVarNConfig(k_bits=4, v_bits=2, page_size=128, refit_iters=PLUS_REFIT_ITERS),
        KVarNConfig(k_bits=2, v_bits=2, page_size=128, refit_iters=PLUS_REFIT_ITERS),
    )
}


def get_preset(name: str = DEFAULT_PRESET, *, head_dim: int = 128, **overrides) -> KVarNConfig:
    """The preset called ``name`` for a model with ``head_dim``, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"Unknown KVarN preset {name!r}: expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], head_dim=head_dim, **overrides)
