"""Shared fixtures and helpers for the CPU test suite."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before the
# kernel modules are imported (scripts/test.sh sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property-based tests: one fixed profile, reproducible in CI (the same examples every run, no
# example database), no per-example deadline (the first call of a kernel compiles it), and a
# bounded number of examples per test (tests override max_examples downwards where costly).
settings.register_profile(
    "kvarn",
    deadline=None,
    max_examples=30,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("kvarn")

# One tolerance table per dtype for float comparisons (absolute, relative).
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def kv_like(pages: int, g: int, heads: int, d: int, *, seed: int = 0, dtype=torch.float32):
    """Random K, V ``[pages, g, heads, d]`` shaped like real caches: K has a few outlier
    channels and a large first token, V is closer to Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(pages, g, heads, d, generator=gen)
    k[..., : max(1, d // 32)] *= 8.0
    k[:, 0] *= 3.0
    v = torch.randn(pages, g, heads, d, generator=gen) * (
        1 + torch.rand(1, g, heads, 1, generator=gen)
    )
    return k.to(dtype), v.to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory):
    """The run's shared stock SGLang servers (``tests/servers.py``)."""
    from servers import ServerPool

    pool = ServerPool(tmp_path_factory.mktemp("servers"))
    yield pool
    pool.stop_all()


# The unit tests of a page's life (which pages commit, slots, sink eviction): with the quality
# tests, the runner of the mutation tests (``scripts/mutation.sh``: ``-m "quality or pagelife"``).
PAGE_LIFE_TESTS = (
    "test_pages.py",
    "test_pool_backend.py",
    "test_slot_pressure.py",
    "test_slot_admission.py",
    "test_prefix_sharing.py",
)


def pytest_addoption(parser):
    parser.addoption(
        "--outside-ci",
        action="store_true",
        help="also run the tests marked outside_ci (too slow for CI's budget)",
    )


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which tags the groups
def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (``--dist loadgroup``), the real-engine tests of one group run in one
    worker, so the run starts each shared server once: a test module names its group with
    ``pytest.mark.xdist_group``; real-engine tests without one share the group "server".
    The page-life unit tests (``PAGE_LIFE_TESTS``) are marked ``pagelife``; tests marked
    ``outside_ci`` are skipped unless ``--outside-ci`` is given."""
    skip = pytest.mark.skip(reason="outside CI's budget: run with --outside-ci")
    for item in items:
        if item.path.name in PAGE_LIFE_TESTS:
            item.add_marker(pytest.mark.pagelife)
        if item.get_closest_marker("outside_ci") and not config.getoption("--outside-ci"):
            item.add_marker(skip)
        if item.get_closest_marker("server") and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("server"))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """A worker stops the run when pytest-xdist did not tag the grouped tests: xdist groups by
    a ``@group`` suffix it writes into each node id, which pytest 9.2 silently ignores (its node
    ids became immutable), and then a group's tests land on both workers, start every shared
    server twice and run stateful tests out of order."""
    # xdist sets ``option.loadgroup`` in its workers only: a run without -n has none.
    if not getattr(session.config.option, "loadgroup", False):
        return
    untagged = [
        item.nodeid
        for item in session.items
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid
    ]
    if untagged:
        session.shouldstop = (
            f"pytest-xdist --dist loadgroup did not group {untagged[0]} (and {len(untagged) - 1} "
            "more): use the pytest pinned in requirements/cpu-test.txt"
        )
