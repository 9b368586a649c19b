"""Commit-time variants of KVarN that keep its stored format, for the ablation benchmark.

Every variant here writes the exact records of a KVarN preset (``KVarNConfig.layout``: packed
low-bit codes, per-row fp16 scale and zero, per-column fp16 norm), so bits per element, the
decode kernels and ``dequantize_pages`` are unchanged; only the one pass at commit time that
chooses codes and metadata differs. Knobs (``VariantSpec``):

* ``iters``: Sinkhorn iterations (the paper: 8);
* ``by_error``: of the normalization's candidates (the start and every iteration), keep the
  one whose per-row RTN reconstructs the tile with the least squared error, instead of the one
  of lowest std imbalance (the paper); ``docs/normalization.md`` measures both;
* ``prenorm``: divide each tile by its RMS before the normalization and absorb the scalar in
  the row scales afterwards, so the ``-0.3`` log-scale floor cannot leave the normalization
  inert on small-magnitude tiles;
* ``clip``: number of candidate RTN ranges per row (1 = min/max, the paper); the range is
  shrunk about its midpoint by ratios ``1 .. clip_min`` and each row keeps the candidate of
  least reconstruction error, weighted by the column norms (the error in the model's domain);
* ``refit``: least-squares refits of each row's scale and zero given its codes, each followed
  by re-rounding; a row keeps a refit only where it lowers the error (``rtn.refit_rows``);
  ``cover``: and only where it clips no element (the ``_plus`` presets are ``refit=4,
  cover=True``); ``reround=False``: keep the codes, take the least-squares scale and zero;
* ``colfit``: alternating least-squares refits of the column norms and of the rows;
* ``recent_pages``: pages before the query's own page also read unquantized (the paper's
  recent window); this costs fp16 memory per sequence instead of changing the record;
* per-layer presets (``LayerwiseMethod``): asymmetric bit allocation across layers.

K and V tiles get their own ``VariantSpec``. ``VariantSpec()`` reproduces
``kvarn_sglang.quant.reference.quantize_pages`` bit-exactly. Names for ``parse_variant``: a preset
then ``+`` knobs (``k2v2_g128+refit4+cover``, ``k2v2_g128+kclip8@0.6+vrefit1``; a ``k``/``v``
prefix applies a knob to K or V only), or ``layers:A/B`` for presets cycled over layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from kvarn_sglang.format.config import get_preset
from kvarn_sglang.format.layout import PageLayout, TileCodes, encode_tiles
from kvarn_sglang.format.numerics import LOG_MAX, LOG_MIN, SCALE_MIN, STD_MAX, STD_MIN
from kvarn_sglang.quant.baselines import KVarNMethod, PageMethod, get_method
from kvarn_sglang.quant.reference import (
    _pow2_rebalance,
    _std,
    _tiles,
    dequantize_pages,
    refit_rows,
    rotate,
    rtn_quantize,
    variance_normalize,
)


@dataclass(frozen=True)
class VariantSpec:
    """Commit-time knobs of a KVarN variant (defaults: the paper's method)."""

    iters: int = 8
    by_error: bool = False
    prenorm: bool = False
    clip: int = 1
    clip_min: float = 0.5
    refit: int = 0
    recent_pages: int = 0
    colfit: int = 0
    reround: bool = True
    cover: bool = False


def _round_codes(x, lo, scale, qmax):
    return torch.round((x - lo) / scale).clamp(0, qmax)


def _row_error(x, codes, scale, zero, weight):
    """Weighted squared error per row. x, codes ``[N, R, C]``; scale, zero ``[N, R, 1]``;
    weight ``[N, 1, C]``; returns ``[N, R, 1]``."""
    return ((codes * scale + zero - x).square() * weight).sum(2, keepdim=True)


def search_rtn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bits: int,
    clip: int,
    clip_min: float,
    refit: int,
    reround: bool = True,
    cover: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric RTN of ``x`` ``fp32 [N, R, C]`` choosing, per row, the range of
    least ``weight``-weighted squared error (``weight`` ``[N, 1, C]``).

    Returns ``(codes uint8 [N, R, C], scale [N, R, 1], zero [N, R, 1])`` as ``rtn_quantize``.
    With ``clip=1, refit=0`` this is exactly ``rtn_quantize(x, bits)``.
    """
    qmax = 2**bits - 1
    lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best = None
    for i in range(clip):
        ratio = 1.0 - (1.0 - clip_min) * i / max(clip - 1, 1)
        c_lo = lo if i == 0 else mid - half * ratio
        scale = (((hi if i == 0 else mid + half * ratio) - c_lo) / qmax).clamp_min(SCALE_MIN)
        codes = _round_codes(x, c_lo, scale, qmax)
        err = _row_error(x, codes, scale, c_lo, weight)
        if best is None:
            best = [codes, scale, c_lo, err]
            continue
        take = err < best[3]
        new = (codes, scale, c_lo, err)
        best = [torch.where(take, n, o) for n, o in zip(new, best, strict=True)]
    codes, scale, zero, _ = best
    for _ in range(refit):
        codes, scale, zero = _refit_rows(x, weight, codes, scale, zero, bits, reround, cover)
    return codes.to(torch.uint8), scale, zero


def _refit_rows(y, w, codes, scale, zero, bits, reround=True, cover=False):
    """One ``rtn.refit_rows`` step; with ``reround=False`` the codes are kept and only the
    least-squares scale/zero are taken (this never raises the error)."""
    if reround:
        codes, scale, zero = refit_rows(y, w, codes, scale, zero, bits, 1, cover)
        return codes.float(), scale, zero
    ww = w.expand_as(y)
    sw, sq, sx = ww.sum(2, True), (ww * codes).sum(2, True), (ww * y).sum(2, True)
    sqq, sqx = (ww * codes * codes).sum(2, True), (ww * codes * y).sum(2, True)
    det = sw * sqq - sq * sq
    ok = det > 1e-6 * sw * sqq
    s_new = torch.where(ok, (sw * sqx - sq * sx) / det.clamp_min(1e-30), scale).clamp_min(SCALE_MIN)
    return codes, s_new, torch.where(ok, (sx - s_new * sq) / sw, zero)


def colfit(m, codes, scale, zero, col, bits, iters):
    """Alternate least-squares refits of the column norms ``col`` ``[N, 1, C]`` (given codes,
    scale, zero ``[N, R, C|1]`` in the row domain) and of the rows, keeping each column or row
    update only where it lowers the model-domain error of ``m`` ``[N, R, C]``."""
    for _ in range(iters):
        a = codes * scale + zero  # [N, R, C]
        num, den = (m * a).sum(1, keepdim=True), a.square().sum(1, keepdim=True)
        floor = 1e-3 * col.abs().amax(2, keepdim=True)
        new = torch.where(den > 1e-30, num / den.clamp_min(1e-30), col)
        new = torch.where(new.abs() >= floor, new, col)
        old_err = (a * col - m).square().sum(1, keepdim=True)
        new_err = (a * new - m).square().sum(1, keepdim=True)
        col = torch.where(new_err < old_err, new, col)
        codes, scale, zero = _refit_rows(m / col, col.square(), codes, scale, zero, bits)
    return codes, scale, zero, col


def normalize_by_error(m: torch.Tensor, iters: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalization's iterations as ``variance_normalize`` runs them, keeping per tile the
    candidate scales (the all-ones start included) under which plain per-row RTN reconstructs
    ``m`` ``fp32 [N, R, C]`` with the least squared error (ties keep the newer). Returns
    ``(row_norm [N, R, 1], col_norm [N, 1, C])``."""

    def error(log_r, log_c):
        r, c = log_r.exp(), log_c.exp()
        codes, scale, zero = rtn_quantize(m / c / r, bits)
        return ((codes * scale + zero) * r * c - m).square().sum((1, 2))

    n, rows, cols = m.shape
    log_c, log_r = m.new_zeros(n, 1, cols), m.new_zeros(n, rows, 1)
    best_c, best_r, best = log_c, log_r, error(log_r, log_c)
    for _ in range(iters):
        col_std = _std(m / log_c.exp() / log_r.exp(), 1).clamp(STD_MIN, STD_MAX)
        log_c = (log_c + col_std.log()).clamp(LOG_MIN, LOG_MAX)
        row_std = _std(m / log_c.exp() / log_r.exp(), 2).clamp(STD_MIN, STD_MAX)
        log_r = (log_r + row_std.log()).clamp(LOG_MIN, LOG_MAX)
        err = error(log_r, log_c)
        better = (err <= best).view(n, 1, 1)
        best_c = torch.where(better, log_c, best_c)
        best_r = torch.where(better, log_r, best_r)
        best = torch.minimum(err, best)
    return best_r.exp(), best_c.exp()


def quantize_oriented_variant(m: torch.Tensor, bits: int, spec: VariantSpec) -> TileCodes:
    """``reference.quantize_oriented`` with the commit-time knobs of ``spec``.
    m: ``fp32 [N, R, C]`` oriented tiles."""
    rms = m.square().mean((1, 2), keepdim=True).sqrt().clamp_min(1e-20) if spec.prenorm else None
    src = m / rms if rms is not None else m
    if spec.by_error:
        row_norm, col_norm = normalize_by_error(src, spec.iters, bits)
    else:
        row_norm, col_norm = variance_normalize(src, spec.iters)
    if rms is not None:
        row_norm = row_norm * rms
    weight = col_norm.square()
    codes, scale, zero = search_rtn(
        m / col_norm / row_norm,
        weight,
        bits,
        spec.clip,
        spec.clip_min,
        spec.refit,
        spec.reround,
        spec.cover,
    )
    scale, zero = scale * row_norm, zero * row_norm
    if spec.colfit:
        codes, scale, zero, col_norm = colfit(
            m, codes.float(), scale, zero, col_norm, bits, spec.colfit
        )
        codes = codes.to(torch.uint8)
    col = col_norm.squeeze(1)
    row_mag = torch.maximum(scale.abs().amax((1, 2)), zero.abs().amax((1, 2)))
    c = _pow2_rebalance(row_mag, col.abs().amax(1))
    scale, zero, col = scale * c.view(-1, 1, 1), zero * c.view(-1, 1, 1), col / c.view(-1, 1)
    return TileCodes(codes, scale.squeeze(2).half(), zero.squeeze(2).half(), col.half())


class VariantMethod(KVarNMethod):
    """A KVarN preset's records, chosen at commit time by ``k_spec`` (K tiles) and
    ``v_spec`` (V tiles)."""

    def __init__(
        self, name: str, preset: str, head_dim: int, k_spec: VariantSpec, v_spec: VariantSpec
    ) -> None:
        super().__init__(preset, head_dim)
        self.name, self.preset, self.k_spec, self.v_spec = name, preset, k_spec, v_spec
        self.recent_pages = k_spec.recent_pages

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p, _, h, _ = k.shape
        k, v = rotate(k), rotate(v)
        k_t = quantize_oriented_variant(_tiles(k, True), self.k_bits, self.k_spec)
        v_t = quantize_oriented_variant(_tiles(v, False), self.v_bits, self.v_spec)
        return encode_tiles(k_t, v_t, self.config.layout, p, h)

    def _dequantize(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantize_pages(records, self.config)


class LayerwiseMethod(PageMethod):
    """Different KVarN presets per layer (``for_layer``); bits per element are the mean over
    layers of each preset's record, so the layout reported is a notional average."""

    def __init__(self, name: str, presets: Sequence[str], head_dim: int) -> None:
        self.name, self.head_dim = name, head_dim
        self.methods = [KVarNMethod(p, head_dim) for p in presets]
        sizes = {m.page_size for m in self.methods}
        if len(sizes) != 1:
            raise ValueError(f"Invalid presets {list(presets)}: expected one page size")
        self.page_size = sizes.pop()
        self.k_bits = round(sum(m.k_bits for m in self.methods) / len(self.methods))
        self.v_bits = round(sum(m.v_bits for m in self.methods) / len(self.methods))

    def for_layer(self, layer: int) -> PageMethod:
        return self.methods[layer % len(self.methods)]

    @cached_property
    def layout(self) -> PageLayout:
        return _MeanLayout(self.methods)

    def _quantize(self, k, v):
        raise ValueError(f"Method {self.name!r} quantizes per layer: use for_layer(layer)")


class _MeanLayout(PageLayout):
    """A stand-in layout whose sizes are the mean over per-layer layouts."""

    def __init__(self, methods: Sequence[PageMethod]) -> None:
        first = methods[0].layout
        super().__init__(first.fields, first.page_size, first.head_dim)
        object.__setattr__(self, "_bytes", sum(m.layout.page_bytes for m in methods) / len(methods))

    @property
    def page_bytes(self) -> float:  # type: ignore[override]
        return self._bytes


KNOB = re.compile(
    r"([kv]?)(?:(prenorm|keepcodes|cover|byerr)|(clip|refit|it|recent|colfit)(\d+)(?:@([0-9.]+))?)"
)


def parse_variant(name: str, head_dim: int, page_size: int = 128) -> PageMethod:
    """Build a method from a variant name, e.g. ``k2v2_g128+clip16+refit2+prenorm+it4+recent1``
    (a preset followed by ``+`` knobs), ``layers:k4v4_g128/k2v2_g128`` (presets cycled over
    layers) or any ``get_method`` name."""
    if name.startswith("layers:"):
        return LayerwiseMethod(name, name[len("layers:") :].split("/"), head_dim)
    if "+" not in name:
        return get_method(name, head_dim=head_dim, page_size=page_size)
    preset, *knobs = name.split("+")
    get_preset(preset)  # unknown presets fail here
    key = {"clip": "clip", "refit": "refit", "it": "iters", "recent": "recent_pages"}
    key["colfit"] = "colfit"
    fields: dict[str, dict] = {"": {}, "k": {}, "v": {}}
    for knob in knobs:
        m = KNOB.fullmatch(knob)
        if m is None:
            raise ValueError(
                f"Unknown variant knob {knob!r} in {name!r}: expected [k|v] followed by "
                f"prenorm, keepcodes, cover, byerr, clipN[@min], refitN, colfitN, itN or recentN"
            )
        target = fields[m[1]]
        if m[2] == "prenorm":
            target["prenorm"] = True
        elif m[2] == "keepcodes":
            target["reround"] = False
        elif m[2] == "cover":
            target["cover"] = True
        elif m[2] == "byerr":
            target["by_error"] = True
        else:
            target[key[m[3]]] = int(m[4])
            if m[5]:
                target["clip_min"] = float(m[5])
    k_spec = VariantSpec(**(fields[""] | fields["k"]))
    v_spec = VariantSpec(**(fields[""] | fields["v"]))
    return VariantMethod(name, preset, head_dim, k_spec, v_spec)
