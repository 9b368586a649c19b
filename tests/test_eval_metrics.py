"""Accuracy metrics of ``kvarn-sglang eval`` (``kvarn_sglang.eval.metrics``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvarn_sglang.eval import metrics as eval_metrics
from kvarn_sglang.eval.metrics import (
    ErrorCurve,
    bucket_mae,
    first_divergence,
    log_probs,
    token_metrics,
)


def _logits(t=40, v=32, seed=0):
    return torch.randn(t, v, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("chunk", [7, 512])
def test_token_metrics_match_torch_losses(monkeypatch, chunk):
    monkeypatch.setattr(eval_metrics, "CHUNK", chunk)  # chunk boundaries must not matter
    ref, ours = _logits(seed=0), _logits(seed=1)
    targets = torch.randint(0, 32, (40,), generator=torch.Generator().manual_seed(2))
    start = 5
    m = token_metrics(log_probs(ref), ours, targets, start)
    rows = slice(start, 39)
    nll = F.cross_entropy(ours[rows], targets[start + 1 :])
    kl = F.kl_div(
        torch.log_softmax(ours[rows], -1),
        torch.log_softmax(ref[rows], -1),
        log_target=True,
        reduction="batchmean",
    )
    agree = (ours[rows].argmax(-1) == ref[rows].argmax(-1)).float().mean()
    assert m.count == 34
    assert m.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert m.kl == pytest.approx(float(kl), rel=1e-5)
    assert m.top1 == pytest.approx(float(agree))
    same = token_metrics(log_probs(ref), ref, targets, start)
    assert abs(same.kl) < 1e-6 and same.top1 == 1.0


def test_token_metrics_rejects_mismatched_logits_and_bad_start():
    ref, targets = log_probs(_logits()), torch.zeros(40, dtype=torch.long)
    with pytest.raises(ValueError, match="Invalid shape of logits"):
        token_metrics(ref, _logits(t=39), targets, 0)
    with pytest.raises(ValueError, match="Invalid shape of logits"):
        token_metrics(ref, _logits(), targets[:30], 0)
    with pytest.raises(ValueError, match="Invalid start 39"):
        token_metrics(ref, _logits(), targets, 39)


def test_bucket_mae_averages_each_bucket_including_a_partial_last_one():
    ref = torch.zeros(2, 5, 3)
    out = torch.zeros(2, 5, 3)
    out[:, 0] = 1.0  # bucket 0: positions 0, 1 -> mean 0.5
    out[0, 3] = 6.0  # bucket 1: positions 2, 3 -> (0 + 3) / 2
    out[:, 4] = -2.0  # bucket 2: position 4 alone -> 2
    torch.testing.assert_close(bucket_mae(out, ref, 2), torch.tensor([0.5, 1.5, 2.0]))


def test_bucket_mae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="Invalid shape of out"):
        bucket_mae(torch.zeros(2, 5, 3), torch.zeros(2, 4, 3), 2)


def test_error_curve_averages_layers_and_rejects_missing_layers():
    curve = ErrorCurve(2, 2)
    ref = torch.zeros(1, 4, 1)
    curve.add(0, torch.ones(1, 4, 1), ref, 2)
    with pytest.raises(ValueError, match="incomplete"):
        curve.curve()
    curve.add(1, torch.tensor([[[3.0], [3.0], [1.0], [1.0]]]), ref, 2)
    assert curve.curve() == [2.0, 1.0]
    assert curve.per_layer() == [1.0, 2.0]


def test_first_divergence_counts_the_matching_prefix():
    ref = torch.tensor([1, 2, 3, 4])
    assert first_divergence(torch.tensor([1, 2, 3, 4]), ref) == 4
    assert first_divergence(torch.tensor([1, 2, 9, 4]), ref) == 2
    assert first_divergence(torch.tensor([0, 2, 3, 4]), ref) == 0


def test_first_divergence_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="Invalid shape of generated"):
        first_divergence(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))


if __name__ == "__main__":
    test_bucket_mae_averages_each_bucket_including_a_partial_last_one()
