"""How much of each float tolerance do the tests use? (``torch.testing.assert_close`` and
``torch.allclose`` in tests/, per call site.)

Runs pytest on the given test files with a plugin that records, at every call of those two
functions made from a file under tests/, the largest absolute error, the largest relative
error and the fraction of the tolerance used, ``max |a - b| / (atol + rtol |b|)``. A tolerance
is "from measurement" (issue 27) when that fraction is at least 0.1 (the tolerance is at most
10x the largest error measured). Prints one row per call site, least used first:

    .venv/bin/python scripts/measure_tolerances.py tests/test_pool_backend.py -k cold
"""

from __future__ import annotations

import sys
import traceback
from collections import defaultdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
_seen: dict[str, dict] = defaultdict(lambda: {"calls": 0, "abs": 0.0, "rel": 0.0, "used": 0.0})


def _site() -> str | None:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename)
        if path.is_relative_to(TESTS):
            return f"{path.relative_to(ROOT)}:{frame.lineno}"
    return None


def _record(actual, expected, atol, rtol) -> None:
    site = _site()
    if site is None or not torch.is_tensor(actual) or not torch.is_tensor(expected):
        return
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != b.shape or a.numel() == 0:
        return
    diff = (a - b).abs()
    row = _seen[site]
    row["calls"] += 1
    row["abs"] = max(row["abs"], float(diff.max()))
    row["rel"] = max(row["rel"], float((diff / b.abs().clamp_min(1e-30)).max()))
    row["atol"], row["rtol"] = atol, rtol
    row["used"] = max(row["used"], float((diff / (atol + rtol * b.abs())).max()))


class Recorder:
    """Wraps the two comparison functions for the whole session."""

    def pytest_sessionstart(self, session):
        close, allclose = torch.testing.assert_close, torch.allclose

        def assert_close(actual, expected, *args, atol=None, rtol=None, **kwargs):
            if atol is not None and rtol is not None:
                _record(actual, expected, atol, rtol)
            return close(actual, expected, *args, atol=atol, rtol=rtol, **kwargs)

        def all_close(a, b, rtol=1e-5, atol=1e-8, equal_nan=False):
            _record(a, b, atol, rtol)
            return allclose(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan)

        torch.testing.assert_close, torch.allclose = assert_close, all_close

    def pytest_terminal_summary(self, terminalreporter):
        write = terminalreporter.write_line
        write("\n| call site | calls | max abs err | max rel err | atol | rtol | used |")
        write("|---|---|---|---|---|---|---|")
        for site, r in sorted(_seen.items(), key=lambda kv: kv[1]["used"]):
            write(
                f"| {site} | {r['calls']} | {r['abs']:.3g} | {r['rel']:.3g} | {r.get('atol')} "
                f"| {r.get('rtol')} | {r['used']:.3g} |"
            )


if __name__ == "__main__":
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[Recorder()]))
