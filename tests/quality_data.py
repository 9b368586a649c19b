"""Fixed-seed K/V pages for the quality tests: the hard cases of real caches in one page.

``hard_pages(pages, g, heads, d, seed)`` gives K and V ``fp32 [pages, g, heads, d]`` with, per
page and head, heavy-tailed values (Student t, 3 degrees of freedom), a few outlier channels
(x8 to x30), one outlier token (x12, the attention-sink pattern) and, in K, channel scales
spread over 100x, so that the variance normalization, the rotation and the rounding all
matter. Generated with numpy (bit-identical everywhere), so the golden records and the oracle
tests see the same bytes on every machine.
"""

from __future__ import annotations

import numpy as np


def hard_pages(pages: int, g: int, heads: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = rng.standard_t(3, size=(pages, g, heads, d)).astype(np.float32)
    v = rng.standard_t(3, size=(pages, g, heads, d)).astype(np.float32)
    k *= np.logspace(-1, 1, d, dtype=np.float32)[rng.permutation(d)]  # channel scales 100x
    for x, outliers in ((k, (8.0, 30.0)), (v, (8.0,))):
        for scale in outliers:
            x[..., int(rng.integers(d))] *= scale  # an outlier channel
        x[:, int(rng.integers(g))] *= 12.0  # an outlier token
    v *= (1 + rng.random((pages, g, heads, 1))).astype(np.float32)  # token scales spread 2x
    return k, v


def spread_tiles(n: int, r: int, c: int, span: float, seed: int = 0) -> np.ndarray:
    """Oriented tiles ``fp32 [n, r, c]`` of Gaussian values whose row scales span ``span``
    (log-uniform) and column scales span 3x: the case the normalization exists for."""
    rng = np.random.default_rng(seed)
    rows = np.exp(rng.uniform(0, np.log(span), size=(n, r, 1)))
    cols = np.exp(rng.uniform(0, np.log(3.0), size=(n, 1, c)))
    return (rng.standard_normal((n, r, c)) * rows * cols).astype(np.float32)


def wikitext_path():
    """``../shared/data/wikitext2-test.raw`` beside the checkout (``KVARN_SHARED_DATA``
    names another folder, e.g. from a git worktree). Skips when absent, except in CI, where
    the folder is always laid out and its absence must fail."""
    import os
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[1]
    folder = Path(os.environ.get("KVARN_SHARED_DATA", root.parent / "shared" / "data"))
    path = folder / "wikitext2-test.raw"
    if not path.exists():
        message = f"{path} not found (set KVARN_SHARED_DATA to the shared data folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
