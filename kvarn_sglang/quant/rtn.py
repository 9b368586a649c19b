"""Per-row asymmetric round-to-nearest, and the least-squares refit of the ``_plus`` presets.

Part of the executable spec (``kvarn_sglang.quant.reference`` re-exports both functions):

* ``rtn_quantize``: the paper's RTN, range ``[min, max]`` of each row (or quantiles);
* ``refit_rows``: given the codes, refit each row's scale and zero point by weighted least
  squares, re-round, and keep the result only in the rows where it lowers the weighted error
  (and, with ``cover``, still clips no element). With the column norms squared as weights
  this is the reconstruction error in the model's domain. The stored format does not change:
  it is a better choice of the same per-row fp16 scale/zero and low-bit codes, made once at
  commit time.

Unconstrained refits converge towards the MSE-optimal range, which clips the large keys that
attention depends on and raises KL although the MSE falls; the ``_plus`` presets use
``cover=True``, so every element stays within half a step as with min/max RTN (see
``docs/plus-presets.md``).
"""

from __future__ import annotations

import torch

from kvarn_sglang.format.numerics import SCALE_MIN


def rtn_quantize(
    x: torch.Tensor, bits: int, clip_quantile: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest per row.

    Args:
        x: ``fp32 [N, R, C]``.
        bits: code width; codes lie in ``[0, 2**bits - 1]``.
        clip_quantile: if > 0, the range is ``[quantile(p), quantile(1 - p)]`` of the row.
    Returns:
        ``(codes uint8 [N, R, C], scale fp32 [N, R, 1], zero fp32 [N, R, 1])`` with
        ``x ~= codes * scale + zero``.
    """
    qmax = 2**bits - 1
    if clip_quantile > 0:
        lo = torch.quantile(x, clip_quantile, dim=2, keepdim=True)
        hi = torch.quantile(x, 1 - clip_quantile, dim=2, keepdim=True)
    else:
        lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(SCALE_MIN)
    codes = torch.round((x - lo) / scale).clamp(0, qmax).to(torch.uint8)
    return codes, scale, lo


def _row_error(x, codes, scale, zero, weight):
    return ((codes * scale + zero - x).square() * weight).sum(2, keepdim=True)


def refit_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    iters: int = 1,
    cover: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares refits of per-row RTN metadata, each followed by re-rounding.

    Per row, with sums over the columns: ``(scale', zero') = argmin sum w (codes*s + z - x)^2``
    (closed form; rows whose codes are all equal keep their scale and zero), then
    ``codes' = clamp(round((x - zero') / scale'), 0, qmax)``; a row takes ``(codes', scale',
    zero')`` only if its weighted squared error is strictly lower.

    Args:
        x: ``fp32 [N, R, C]`` the values that were rounded.
        weight: ``fp32 [N, 1, C]`` per-column error weights (> 0).
        codes, scale, zero: ``rtn_quantize``'s output (codes ``uint8 [N, R, C]``, scale and
            zero ``fp32 [N, R, 1]``).
        iters: refits in sequence (0 returns the input).
        cover: also require that the new grid covers the row, ``zero' - scale'/2 <= min`` and
            ``zero' + (qmax + 1/2) * scale' >= max``, so no element is clipped: every one
            stays within half a step, as with min/max RTN.
    Returns:
        ``(codes uint8 [N, R, C], scale fp32 [N, R, 1], zero fp32 [N, R, 1])``.
    """
    qmax = 2**bits - 1
    q = codes.float()
    w = weight.expand_as(x)
    sw = w.sum(2, keepdim=True)
    lo, hi = x.amin(2, keepdim=True), x.amax(2, keepdim=True)
    for _ in range(iters):
        err = _row_error(x, q, scale, zero, weight)
        sq, sx = (w * q).sum(2, keepdim=True), (w * x).sum(2, keepdim=True)
        sqq, sqx = (w * q * q).sum(2, keepdim=True), (w * q * x).sum(2, keepdim=True)
        det = sw * sqq - sq * sq
        ok = det > 1e-6 * sw * sqq
        s_new = torch.where(ok, (sw * sqx - sq * sx) / det.clamp_min(1e-30), scale)
        s_new = s_new.clamp_min(SCALE_MIN)
        z_new = torch.where(ok, (sx - s_new * sq) / sw, zero)
        q_new = torch.round((x - z_new) / s_new).clamp(0, qmax)
        take = _row_error(x, q_new, s_new, z_new, weight) < err
        if cover:
            take &= (z_new - s_new / 2 <= lo) & (z_new + (qmax + 0.5) * s_new >= hi)
        q = torch.where(take, q_new, q)
        scale, zero = torch.where(take, s_new, scale), torch.where(take, z_new, zero)
    return q.to(torch.uint8), scale, zero
