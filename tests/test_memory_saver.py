"""``--enable-memory-saver`` with KVarN (``page_store`` module docstring).

SGLang's memory saver unmaps the tensors allocated inside its KV-cache region on
``release_memory_occupation``, flushes the cache, and maps fresh memory (arbitrary bytes) on
``resume_memory_occupation``. The torch_memory_saver package needs CUDA, so on CPU this
checks the two things that make it work: the KVarN pages and slots are allocated inside that
region and the bookkeeping outside it, and after a flush, with every page and slot holding
garbage (NaN), requests compute exactly what they computed on fresh memory.
"""

from __future__ import annotations

import contextlib
import random

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang_harness import SimServer

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.serving.pool import KVarNTokenToKVPool

G = 64
CFG = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=1)


class RecordingAdapter:
    """Stands in for SGLang's memory-saver adapter: records the tensors that torch
    allocates inside ``region(tag)``."""

    def __init__(self) -> None:
        self.tag: str | None = None
        self.inside: list[torch.Tensor] = []
        self.outside: list[torch.Tensor] = []

    @contextlib.contextmanager
    def region(self, tag: str, enable_cpu_backup: bool = False):
        self.tag = tag
        yield
        self.tag = None

    def record(self, tensor: torch.Tensor) -> torch.Tensor:
        (self.inside if self.tag == "kv_cache" else self.outside).append(tensor)
        return tensor


def test_pages_and_slots_live_in_the_memory_saver_region_and_bookkeeping_outside(monkeypatch):
    from sglang.srt.mem_cache import memory_pool

    adapter = RecordingAdapter()
    monkeypatch.setattr(memory_pool.TorchMemorySaverAdapter, "create", lambda enable: adapter)
    for name in ("zeros", "full", "arange"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=real, **k: adapter.record(_f(*a, **k)))
    pool = KVarNTokenToKVPool(
        4 * G, G, torch.float16, 2, 64, 3, "cpu", True, start_layer=0, end_layer=3,
        kvarn_config=CFG, num_slots=4,
    )  # fmt: skip
    store = pool.store

    def ids(tensors):
        return {id(t) for t in tensors}

    buffers = [*store.packed, *store.slot_k, *store.slot_v]
    assert ids(buffers) <= ids(adapter.inside)
    assert ids([store.page_slot, store.commits, store._stack]) <= ids(adapter.outside)


def _serve(server: SimServer, prompts: list[list[int]]) -> list[dict]:
    reqs = [server.start(p) for p in prompts]
    assert server.extend(reqs, [len(p) for p in prompts])
    for step in range(G + 3):
        for i, r in enumerate(reqs):
            r.tokens.append((step * 5 + i) % 60)
        assert server.decode(reqs)
    for r in reqs:
        server.finish(r)
    return [r.outputs for r in reqs]


def test_after_release_and_resume_garbage_pages_and_slots_are_never_read():
    server = SimServer(CFG, num_pages=24, num_slots=8, layers=2)
    rng = random.Random(0)
    prompts = [[rng.randrange(60) for _ in range(n)] for n in (2 * G + 5, G - 3, 3 * G)]
    fresh = _serve(server, [list(p) for p in prompts])
    # release_memory_occupation: unmap, then flush the cache (tree, request rows, allocator).
    server.tree.evict(EvictParams(num_tokens=server.alloc.size))
    server.alloc.clear()
    store = server.pool.store
    # resume_memory_occupation: fresh memory with arbitrary bytes.
    for buf in (*store.packed,):
        buf.fill_(0xFF)
    for buf in (*store.slot_k, *store.slot_v):
        buf.fill_(float("nan"))
    again = _serve(server, [list(p) for p in prompts])
    for a, b in zip(fresh, again, strict=True):
        assert a.keys() == b.keys()
        for pos in a:
            for x, y in zip(a[pos], b[pos], strict=True):
                assert torch.equal(x, y), pos


if __name__ == "__main__":
    test_after_release_and_resume_garbage_pages_and_slots_are_never_read()
