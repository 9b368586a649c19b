"""Byte layout of one stored page of one KV head, shared by KVarN and every baseline.

A page record is a flat run of bytes holding named fields back to back, each a small tensor
of a fixed dtype and shape. A pool stores records as ``uint8 [num_pages, num_kv_heads,
page_bytes]``; ``PageLayout.pack`` builds that tensor from the fields and ``PageLayout.unpack``
returns the fields as views into it. Every field starts on a 16-byte boundary so kernels can
use vector loads; padding (zero for every shipped preset) is counted in ``page_bytes``.

The layout of a low-bit tile method (KVarN, KIVI, Hadamard-RTN, int per-token) is built by
``tile_layout``: for K and for V, the codes of the oriented tile, a per-row scale and zero
point, and, for variance-normalized methods, a per-column norm::

    k_codes  uint8 [k_rows, k_cols * k_bits / 8]      (planar: [G, D * k_bits / 8])
    v_codes  uint8 [v_rows, v_cols * v_bits / 8]      (planar: [D * v_bits / 8, G])
    k_scale  fp16 [k_rows]   k_zero fp16 [k_rows]   (k_norm fp16 [k_cols])
    v_scale  fp16 [v_rows]   v_zero fp16 [v_rows]   (v_norm fp16 [v_cols])

and an element is reconstructed as ``(code * scale[row] + zero[row]) * norm[col]``.

Two code orders, same bytes:

* ``rows`` (baselines): each row of the oriented tile packed little-endian along its columns
  (``pack_codes``: element c -> byte c // (8/bits), shift (c % (8/bits)) * bits).
* ``planar`` (KVarN, what the kernels read): both code matrices are taken token-major,
  ``[G, D]``, and packed *planar* along D (``pack_planar``: channel c -> byte c % (D/per),
  shift (c // (D/per)) * bits, per = 8/bits, so byte j holds channels j, j + D/per, ...).
  K stores that ``[G, D*bits/8]`` matrix, V its transpose ``[D*bits/8, G]``: in both, the
  bytes along the dimension an attention dot product reduces over (channels for q.K, tokens
  for p.V) are contiguous, and a byte's codes belong to different channel blocks, so a kernel
  unpacks with a mask per block and no shuffle (``kernels/page_tiles.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALIGN = 16


@dataclass(frozen=True)
class Field:
    """One named tensor inside a page record."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class PageLayout:
    """The fields of one page of one KV head, their offsets and the record size.

    Attributes:
        fields: the fields in storage order.
        page_size: tokens per page (the tile size G).
        head_dim: channels per KV head (D).
        planar: codes in the ``planar`` order (module docstring), else ``rows``.
    """

    fields: tuple[Field, ...]
    page_size: int
    head_dim: int
    planar: bool = False

    @staticmethod
    def build(
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        page_size: int,
        head_dim: int,
        planar: bool = False,
    ) -> PageLayout:
        fields, offset = [], 0
        for name, dtype, shape in specs:
            field = Field(name, dtype, tuple(shape), offset)
            fields.append(field)
            offset += -(-field.nbytes // ALIGN) * ALIGN
        return PageLayout(tuple(fields), page_size, head_dim, planar)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one KV head, padding included."""
        last = self.fields[-1]
        return -(-(last.offset + last.nbytes) // ALIGN) * ALIGN

    @property
    def bytes_per_token(self) -> float:
        """Bytes per token per KV head, K and V together."""
        return self.page_bytes / self.page_size

    @property
    def bits_per_element(self) -> float:
        """Average stored bits per K or V element, all metadata counted."""
        return 8 * self.page_bytes / (2 * self.page_size * self.head_dim)

    @property
    def compression(self) -> float:
        """How many times smaller than a 16-bit K+V page."""
        return 2 * 2 * self.page_size * self.head_dim / self.page_bytes

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def pack(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Write fields into records.

        Args:
            parts: for every field, a tensor ``[*batch, *field.shape]`` of ``field.dtype``.
        Returns:
            ``uint8 [*batch, page_bytes]``.
        """
        names = {f.name for f in self.fields}
        if set(parts) != names:
            raise ValueError(f"Invalid fields: expected {sorted(names)}, got {sorted(parts)}")
        first = self.fields[0]
        batch = parts[first.name].shape[: parts[first.name].dim() - len(first.shape)]
        out = torch.zeros(
            *batch, self.page_bytes, dtype=torch.uint8, device=parts[first.name].device
        )
        for f in self.fields:
            t = parts[f.name]
            if t.dtype != f.dtype or tuple(t.shape) != (*batch, *f.shape):
                raise ValueError(
                    f"Invalid shape of {f.name}: expected {[*batch, *f.shape]} {f.dtype}, "
                    f"got {list(t.shape)} {t.dtype}"
                )
            raw = t.contiguous().reshape(*batch, -1).view(torch.uint8)
            out[..., f.offset : f.offset + f.nbytes] = raw
        return out

    def unpack(self, records: torch.Tensor) -> dict[str, torch.Tensor]:
        """Read fields out of ``uint8 [*batch, page_bytes]`` records (copies, contiguous)."""
        if records.dtype != torch.uint8 or records.shape[-1] != self.page_bytes:
            raise ValueError(
                f"Invalid shape of records: expected [..., {self.page_bytes}] uint8, "
                f"got {list(records.shape)} {records.dtype}"
            )
        batch = records.shape[:-1]
        out = {}
        for f in self.fields:
            raw = records[..., f.offset : f.offset + f.nbytes].contiguous()
            out[f.name] = raw.view(f.dtype).reshape(*batch, *f.shape)
        return out

    def describe(self) -> str:
        """A human-readable table of the fields, for docs and the CLI."""
        rows = [f"{'field':<10} {'dtype':<14} {'shape':<12} {'offset':>7} {'bytes':>7}"]
        for f in self.fields:
            dtype = str(f.dtype).replace("torch.", "")
            rows.append(f"{f.name:<10} {dtype:<14} {f.shape!s:<12} {f.offset:>7} {f.nbytes:>7}")
        rows.append(f"{'total':<10} {'':<14} {'':<12} {'':>7} {self.page_bytes:>7}")
        return "\n".join(rows)


def tile_layout(
    *,
    page_size: int,
    head_dim: int,
    k_bits: int,
    v_bits: int,
    k_per_channel: bool,
    normalized: bool,
    planar: bool = False,
) -> PageLayout:
    """Layout of a low-bit tile method (see the module docstring).

    K is oriented ``[head_dim, page_size]`` when quantized per channel (KVarN, KIVI), else
    ``[page_size, head_dim]`` (per token); V is always ``[page_size, head_dim]`` (per token).
    ``planar`` stores the codes in the planar order (K must be per channel).
    """
    g, d = page_size, head_dim
    k_rows, k_cols = (d, g) if k_per_channel else (g, d)
    v_rows, v_cols = g, d
    if planar and not k_per_channel:
        raise ValueError("Unsupported planar code order with per-token K: KVarN layouts only")
    k_shape = (g, d * k_bits // 8) if planar else (k_rows, k_cols * k_bits // 8)
    v_shape = (d * v_bits // 8, g) if planar else (v_rows, v_cols * v_bits // 8)
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
        ("k_codes", torch.uint8, k_shape),
        ("v_codes", torch.uint8, v_shape),
        ("k_scale", torch.float16, (k_rows,)),
        ("k_zero", torch.float16, (k_rows,)),
    ]
    if normalized:
        specs.append(("k_norm", torch.float16, (k_cols,)))
    specs += [("v_scale", torch.float16, (v_rows,)), ("v_zero", torch.float16, (v_rows,))]
    if normalized:
        specs.append(("v_norm", torch.float16, (v_cols,)))
    return PageLayout.build(specs, page_size, head_dim, planar)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8 [..., C]`` codes little-endian: element c -> byte c // (8 / bits), shift
    (c % (8 / bits)) * bits. Returns ``uint8 [..., C * bits / 8]``."""
    if bits not in (2, 4, 8):
        raise ValueError(f"Unsupported bits {bits}: packing supports 2, 4 and 8")
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"Invalid shape of codes: last dim must be a multiple of {per}")
    grouped = codes.to(torch.int32).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: ``uint8 [..., B]`` -> ``uint8 [..., B * 8 / bits]``."""
    if bits not in (2, 4, 8):
        raise ValueError(f"Unsupported bits {bits}: packing supports 2, 4 and 8")
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def pack_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8 [..., C]`` codes planar: element c -> byte c % (C / per) at shift
    (c // (C / per)) * bits, per = 8 / bits. Returns ``uint8 [..., C * bits / 8]``."""
    if bits not in (2, 4):
        raise ValueError(f"Unsupported bits {bits}: planar packing supports 2 and 4")
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"Invalid shape of codes: last dim must be a multiple of {per}")
    planes = codes.to(torch.int32).unflatten(-1, (per, -1))  # [..., per, C / per]
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int32) * bits).unsqueeze(-1)
    return (planes << shifts).sum(-2).to(torch.uint8)


def unpack_planar(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_planar``: ``uint8 [..., B]`` -> ``uint8 [..., B * 8 / bits]``."""
    if bits not in (2, 4):
        raise ValueError(f"Unsupported bits {bits}: planar packing supports 2 and 4")
    per = 8 // bits
    shifts = (torch.arange(per, device=packed.device, dtype=torch.int32) * bits).unsqueeze(-1)
    planes = (packed.to(torch.int32).unsqueeze(-2) >> shifts) & (2**bits - 1)
    return planes.flatten(-2).to(torch.uint8)


def _pack_tile(codes: torch.Tensor, bits: int, planar: bool, is_k: bool) -> torch.Tensor:
    """Oriented codes ``[N, R, C]`` -> the stored ``k_codes``/``v_codes`` ``[N, ...]``."""
    if not planar:
        return pack_codes(codes, bits)
    token_major = codes.transpose(1, 2) if is_k else codes  # [N, G, D]
    packed = pack_planar(token_major, bits)  # [N, G, D * bits / 8]
    return packed if is_k else packed.transpose(1, 2).contiguous()


def _unpack_tile(packed: torch.Tensor, bits: int, planar: bool, is_k: bool) -> torch.Tensor:
    """Inverse of ``_pack_tile``."""
    if not planar:
        return unpack_codes(packed, bits)
    token_major = unpack_planar(packed if is_k else packed.transpose(1, 2), bits)
    return token_major.transpose(1, 2).contiguous() if is_k else token_major


@dataclass
class TileCodes:
    """A batch of quantized oriented tiles ``[N, R, C]``; element = (code*scale + zero)*norm.

    Attributes:
        codes: ``uint8 [N, R, C]`` unpacked codes.
        scale, zero: ``fp16 [N, R]`` per-row metadata (normalization absorbed).
        norm: ``fp16 [N, C]`` per-column metadata, or None for methods without normalization.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    norm: torch.Tensor | None


def encode_tiles(
    k_t: TileCodes, v_t: TileCodes, layout: PageLayout, p: int, h: int
) -> torch.Tensor:
    """Pack K and V ``TileCodes`` of ``P*H`` tiles into records ``uint8 [P, H, page_bytes]``."""
    k_bits = 8 * layout.field("k_codes").nbytes // k_t.codes[0].numel()
    v_bits = 8 * layout.field("v_codes").nbytes // v_t.codes[0].numel()
    parts = {
        "k_codes": _pack_tile(k_t.codes, k_bits, layout.planar, True),
        "v_codes": _pack_tile(v_t.codes, v_bits, layout.planar, False),
        "k_scale": k_t.scale,
        "k_zero": k_t.zero,
        "v_scale": v_t.scale,
        "v_zero": v_t.zero,
    }
    if k_t.norm is not None:
        parts["k_norm"], parts["v_norm"] = k_t.norm, v_t.norm
    parts = {name: t.reshape(p, h, *t.shape[1:]) for name, t in parts.items()}
    return layout.pack(parts)


def decode_tiles(records: torch.Tensor, layout: PageLayout) -> tuple[TileCodes, TileCodes]:
    """Inverse of ``encode_tiles``: records ``uint8 [P, H, page_bytes]`` -> K, V TileCodes."""
    f = {name: t.flatten(0, 1) for name, t in layout.unpack(records).items()}
    out = []
    for kind in ("k", "v"):
        packed = f[f"{kind}_codes"]
        bits = 8 * layout.field(f"{kind}_codes").nbytes // (layout.head_dim * layout.page_size)
        codes = _unpack_tile(packed, bits, layout.planar, kind == "k")
        out.append(TileCodes(codes, f[f"{kind}_scale"], f[f"{kind}_zero"], f.get(f"{kind}_norm")))
    return out[0], out[1]
