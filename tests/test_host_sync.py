"""A forward pass reads device values back to the host a fixed number of times, however many
layers the model has: every per-pass table (extend blocks, commit lists, page ids) is built
once in ``init_forward_metadata`` from host lengths, and a layer's write, commit and attention
only launch work (on a GPU a read-back stalls the launch queue once per layer).

Counted on CPU by wrapping every way a tensor's values reach Python (``tolist``, ``item``,
``cpu``, ``numpy``, ``bool``/``int``/``float``) while ``SimServer`` drives SGLang's real pool
and allocator through the backend's GPU path (``use_kernels``), the Triton launchers
included; the kernels themselves are replaced by no-ops (the launch is what is tested)."""

from __future__ import annotations

import contextlib
import random
from collections import Counter

import pytest
import torch
from sglang_harness import SimServer

import kvarn_sglang.kernels.commit as commit_mod
import kvarn_sglang.kernels.decode as decode_mod
import kvarn_sglang.kernels.extend as extend_mod
from kvarn_sglang.format.config import KVarNConfig

G = 64
CFG = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=1)
READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__")


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def counting_host_reads():
    counts: Counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counts[name] += 1
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.fixture
def no_kernels(monkeypatch):
    for mod, names in (
        (extend_mod, ["_extend_kernel"]),
        (decode_mod, ["_decode_split_kernel", "_decode_merge_kernel"]),
        (commit_mod, ["_commit_tile_kernel"]),
    ):
        for name in names:
            monkeypatch.setattr(mod, name, _NoLaunch())


def _reads_per_pass(layers: int) -> tuple[Counter, Counter]:
    """Host reads of a batched extend (prefix hit, pages completed from slots and directly)
    and of a decode step that completes a page: over the whole passes, and inside the layers."""
    server = SimServer(CFG, num_pages=24, num_slots=12, layers=layers)
    server.pool.store.use_kernels = True
    in_layers = Counter()
    backend = server.backend
    for name in ("forward_extend", "forward_decode"):
        fn = getattr(backend, name)

        def per_layer(*args, _fn=fn, **kwargs):
            with counting_host_reads() as c:
                out = _fn(*args, **kwargs)
            in_layers.update(c)
            return out

        setattr(backend, name, per_layer)
    rng = random.Random(0)
    # A: pages completed from a slot in the second extend (page 1) and by the decode step
    # (page 2); B: pages completed straight from the second extend's tokens (pages 1, 2).
    reqs = [server.start([rng.randrange(64) for _ in range(n)]) for n in (3 * G, 3 * G + 2)]
    assert server.extend(reqs, [G + 5, 2])
    with counting_host_reads() as whole:
        assert server.extend(reqs, [3 * G - 1 - (G + 5), 3 * G + 2 - 2])
        assert server.decode(reqs[:1])
    assert reqs[0].kv_len == 3 * G and reqs[1].kv_len == 3 * G + 2
    return whole, in_layers


def test_layers_read_nothing_back_and_a_pass_reads_the_same_with_more_layers(no_kernels):
    whole2, layers2 = _reads_per_pass(2)
    whole4, layers4 = _reads_per_pass(4)
    assert sum(layers2.values()) == sum(layers4.values()) == 0, (layers2, layers4)
    assert whole4 == whole2, (whole2, whole4)


if __name__ == "__main__":
    print(_reads_per_pass(2), _reads_per_pass(4))
