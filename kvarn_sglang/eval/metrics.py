"""Accuracy metrics of a quantized cache against the same model with the unquantized cache.

* ``token_metrics``: over teacher-forced next-token predictions, perplexity of the text, mean
  KL(reference || quantized) of the next-token distributions and top-1 agreement;
* ``ErrorCurve``: mean absolute error of attention outputs versus the reference, per layer
  and per position bucket (the error-accumulation curve);
* ``first_divergence``: how many greedy tokens match the reference before the first mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CHUNK = 512  # positions per chunk: keeps [chunk, vocab] temporaries small at vocab ~50k


@dataclass
class TokenMetrics:
    """Teacher-forced next-token metrics over ``count`` predictions."""

    ppl: float
    kl: float
    top1: float
    count: int


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``fp32 [T, V]`` log-softmax of logits ``[T, V]``, computed chunk by chunk."""
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for s in range(0, logits.shape[0], CHUNK):
        out[s : s + CHUNK] = torch.log_softmax(logits[s : s + CHUNK].float(), dim=-1)
    return out


def token_metrics(
    ref_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, start: int
) -> TokenMetrics:
    """Metrics of the predictions at positions ``start .. T-2`` (each predicts the next token).

    Args:
        ref_logp: ``fp32 [T, V]`` reference log-probabilities (``log_probs`` of its logits).
        logits: ``[T, V]`` logits of the quantized run on the same tokens.
        targets: ``int [T]`` the token ids; position t is scored against ``targets[t + 1]``.
        start: first scored position.
    """
    t = targets.shape[0]
    if ref_logp.shape != logits.shape or ref_logp.shape[0] != t:
        raise ValueError(
            f"Invalid shape of logits: expected {list(ref_logp.shape)} (reference) with "
            f"{t} positions, got {list(logits.shape)}"
        )
    if not 0 <= start < t - 1:
        raise ValueError(f"Invalid start {start}: expected 0 <= start < {t - 1}")
    nll = kl = agree = 0.0
    for s in range(start, t - 1, CHUNK):
        e = min(s + CHUNK, t - 1)
        lp, rp = torch.log_softmax(logits[s:e].float(), -1), ref_logp[s:e]
        nll += float(-lp.gather(1, targets[s + 1 : e + 1, None]).sum())
        kl += float((rp.exp() * (rp - lp)).sum())
        agree += float((lp.argmax(-1) == rp.argmax(-1)).sum())
    n = t - 1 - start
    return TokenMetrics(ppl=math.exp(nll / n), kl=kl / n, top1=agree / n, count=n)


def bucket_mae(out: torch.Tensor, ref: torch.Tensor, bucket: int) -> torch.Tensor:
    """Mean absolute error of ``out`` vs ``ref`` ``[H, T, D]`` per bucket of positions.

    Returns ``fp32 [ceil(T / bucket)]``: bucket b averages positions ``b*bucket ..``, all heads
    and channels.
    """
    if out.shape != ref.shape or out.dim() != 3:
        raise ValueError(
            f"Invalid shape of out: expected {list(ref.shape)} ([H, T, D]), got {list(out.shape)}"
        )
    err = (out.float() - ref.float()).abs().mean(dim=(0, 2))  # [T]
    n = -(-err.shape[0] // bucket)
    padded = err.new_zeros(n * bucket)
    padded[: err.shape[0]] = err
    counts = padded.new_zeros(n * bucket)
    counts[: err.shape[0]] = 1
    return padded.view(n, bucket).sum(1) / counts.view(n, bucket).sum(1)


class ErrorCurve:
    """Per-layer, per-bucket attention-output MAE, filled one layer at a time."""

    def __init__(self, num_layers: int, num_buckets: int) -> None:
        self.values = torch.full((num_layers, num_buckets), float("nan"))

    def add(self, layer: int, out: torch.Tensor, ref: torch.Tensor, bucket: int) -> None:
        """Record layer ``layer``'s error of ``out`` vs ``ref`` ``[H, T, D]``."""
        self.values[layer] = bucket_mae(out, ref, bucket).cpu()

    def curve(self) -> list[float]:
        """MAE per bucket, averaged over layers."""
        if torch.isnan(self.values).any():
            raise ValueError("ErrorCurve is incomplete: some layers were never recorded")
        return [float(x) for x in self.values.mean(0)]

    def per_layer(self) -> list[float]:
        """MAE per layer, averaged over buckets."""
        return [float(x) for x in self.values.mean(1)]


def first_divergence(generated: torch.Tensor, reference: torch.Tensor) -> int:
    """Number of leading tokens of ``generated`` equal to ``reference`` (both ``int [N]``)."""
    if generated.shape != reference.shape or generated.dim() != 1:
        raise ValueError(
            f"Invalid shape of generated: expected {list(reference.shape)}, "
            f"got {list(generated.shape)}"
        )
    mismatch = (generated != reference).nonzero()
    return int(mismatch[0]) if len(mismatch) else int(reference.shape[0])
