"""The KVarN host pool of HiCache (``kvarn_sglang.serving.host_pool``) on CPU, without a server:
a KVarN pool filled through SGLang's real allocator and tree (``sglang_harness.SimServer``),
its tree pages backed up to host records and loaded back into other device pages, byte for
byte, layer by layer, and through the L3 page objects; the arena's accounting of sink pages."""

from __future__ import annotations

import random

import pytest
import torch
from sglang_harness import SimServer

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.serving.host_pool import KVarNHostPool, storage_format_tag

G = 64
CFG = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=1)


def _filled(sink_pages: int = 1):
    """A SimServer whose request holds 3 full pages (sink fp16, then packed) + a partial one;
    the device token indices of the full pages. (No Sinkhorn iterations: the same records,
    made faster.)"""
    cfg = KVarNConfig(
        k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=sink_pages, sinkhorn_iters=0
    )
    server = SimServer(cfg, num_pages=24, num_slots=8)
    tokens = [random.Random(0).randrange(64) for _ in range(3 * G + 9)]
    req = server.start(tokens)
    assert server.extend([req], [len(tokens)])
    indices = server.req_pool.req_to_token[req.row, : 3 * G].to(torch.long)
    return server, indices


def _host(server, ratio: float = 2.0) -> KVarNHostPool:
    return KVarNHostPool(server.pool, ratio, 0, G)


def _device_pages(server, indices):
    store, pages = server.pool.store, indices[::G] // G
    slots = store.page_slot[pages]
    layers = range(len(store.packed))
    return (
        [store.packed[layer][pages].clone() for layer in layers],
        [store.slot_k[layer][slots].clone() for layer in layers],
        [store.slot_v[layer][slots].clone() for layer in layers],
        store.page_slot[pages] != store.scratch,
    )


def _roundtrip(server, host, indices):
    """Back the pages at ``indices`` up and load them into freshly allocated device pages
    (the controller's path); the new device indices."""
    sinks = host.device_sink_offsets(indices)
    host_indices = host.alloc_pages(len(indices), sinks)
    host.backup_from_device_all_layer(server.pool, host_indices, indices, "kernel")
    loaded = server.alloc.alloc_loaded(len(indices), sinks)
    for layer in range(host.layer_num):
        host.load_to_device_per_layer(server.pool, host_indices, loaded, layer, "kernel")
    return host_indices, loaded


@pytest.fixture(scope="module")
def filled():
    return _filled()


@pytest.mark.parametrize("sink_pages", [0, 1, 2])
def test_pages_come_back_from_host_byte_for_byte_with_sinks_in_their_own_slots(sink_pages, filled):
    server, indices = filled if sink_pages == 1 else _filled(sink_pages)
    host = _host(server)
    before = _device_pages(server, indices)
    assert before[3].tolist() == [j < sink_pages for j in range(3)]
    _, loaded = _roundtrip(server, host, indices)
    after = _device_pages(server, loaded)
    assert not torch.equal(loaded, indices)  # other device pages
    for layer in range(host.layer_num):
        assert torch.equal(before[0][layer][~before[3]], after[0][layer][~after[3]])
        assert torch.equal(before[1][layer][before[3]], after[1][layer][after[3]])
        assert torch.equal(before[2][layer][before[3]], after[2][layer][after[3]])
    # Only sink pages took a slot, and they are marked as sinks for admission and the checks.
    assert after[3].tolist() == before[3].tolist()
    assert server.alloc.verify_byte_accounting() == []
    record = host.layer_num * host.record_bytes
    assert host.bytes_to_host == host.bytes_to_device
    assert host.bytes_to_host == (3 - sink_pages) * record + sink_pages * host.layer_num * (
        host.sink_bytes
    )


def test_a_sink_page_costs_ceil_fp16_over_packed_records_and_gives_them_back(filled):
    server, indices = filled
    host = _host(server)
    assert host.sink_records == 5  # 2 x 64 x 2 x 64 x 2 B over 2 x 3840 B per layer
    free = host.available_size()
    host_indices = host.alloc_pages(len(indices), host.device_sink_offsets(indices))
    assert free - host.available_size() == (3 + 4) * G
    assert host.state()["host_sink_pages"] == 1 and host.verify() == []
    host.free(host_indices)
    assert host.available_size() == free and host.state()["host_sink_pages"] == 0
    assert host.verify() == []


def test_an_allocation_that_does_not_fit_takes_nothing(filled):
    server, indices = filled
    host = _host(server)
    held = host.alloc_pages(host.available_size() - 6 * G, [])
    assert host.alloc_pages(len(indices), [0]) is None  # 3 + 4 records > 6 free
    assert host.available_size() == 6 * G
    assert host.alloc_pages(len(indices), []) is not None
    host.free(held)
    assert host.verify() == []


def test_l3_objects_are_a_packed_pages_records_or_a_sink_pages_fp16(filled):
    server, indices = filled
    host = _host(server)
    sinks = host.device_sink_offsets(indices)
    host_indices = host.alloc_pages(len(indices), sinks)
    host.backup_from_device_all_layer(server.pool, host_indices, indices, "kernel")
    objects = [host.get_data_page(host_indices[j * G]).clone() for j in range(3)]
    assert [o.numel() for o in objects] == [host.page_object_bytes(j == 0) for j in range(3)]
    store = server.pool.store
    slot = store.page_slot[indices[0] // G]
    fp16 = torch.stack([store.slot_k[0][slot], store.slot_v[0][slot]]).view(torch.uint8)
    assert torch.equal(objects[0][: host.sink_bytes], fp16.flatten())  # layer 0 first
    # Prefetch into other host pages (the first one a sink, as the controller marks it).
    again = host.alloc_pages(len(indices), [0])
    for j in range(3):
        host.set_from_flat_data_page(again[j * G], objects[j])
    assert [torch.equal(host.get_data_page(again[j * G]), objects[j]) for j in range(3)] == [
        True
    ] * 3
    with pytest.raises(ValueError, match="Invalid shape of L3 page"):
        host.set_from_flat_data_page(again[G], objects[0])


def test_the_l3_key_names_the_preset_the_sink_pages_and_the_fp16_dtype():
    tags = {
        storage_format_tag(cfg, dtype)
        for cfg in (CFG, KVarNConfig(k_bits=4, v_bits=4, page_size=G, head_dim=64),
                    KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=2))
        for dtype in (torch.float16, torch.bfloat16)
    }  # fmt: skip
    assert len(tags) == 6
    assert storage_format_tag(CFG, torch.bfloat16) == "kvarn_k4v2_g64_sink1_bfloat16"


def test_flush_forgets_the_sink_records(filled):
    server, indices = filled
    host = _host(server)
    host.alloc_pages(len(indices), [0])
    host.clear()
    assert host.available_size() == host.page_num * G
    assert host.state()["host_sink_pages"] == 0 and host.verify() == []


def test_every_layer_waits_for_its_loaded_pages_before_it_reads(filled):
    """Layer-wise loading: the backend waits on SGLang's per-layer load event of a layer
    (``LayerDoneCounter.wait_until``) before that layer writes, commits or attends."""
    server, _ = filled
    waited = []
    counter = type("Counter", (), {"wait_until": lambda self, layer: waited.append(layer)})()
    server.pool.register_layer_transfer_counter(counter)
    try:
        req = server.start([5] * (G + 3))
        assert server.extend([req], [G + 3 - req.cached_len])
        server.finish(req)
    finally:
        server.pool.register_layer_transfer_counter(None)
    assert waited == [0, 1]


def test_host_pool_rejects_another_page_size_and_a_host_without_room(filled, monkeypatch):
    server, _ = filled
    with pytest.raises(ValueError, match="Unsupported page_size 128"):
        KVarNHostPool(server.pool, 2.0, 0, 128)
    from sglang.srt.mem_cache import host_memory

    monkeypatch.setattr(host_memory, "available_host_memory_bytes", lambda **kw: 1000)
    with pytest.raises(ValueError, match="Not enough host memory for the KVarN HiCache pool"):
        _host(server)


def test_builder_and_controller_reject_what_kvarn_hicache_does_not_do(filled):
    from types import SimpleNamespace

    from kvarn_sglang.serving.hicache import (
        KVarNCacheController,
        KVarNHostPoolBuilder,
        KVarNStackStrategy,
        kvarn_host_pool_decl,
    )

    server, indices = filled
    decl = kvarn_host_pool_decl(server.pool)
    assert decl.storage_info.bytes_per_token_per_layer == 2 * 3840 // G
    builder = KVarNHostPoolBuilder()
    with pytest.raises(ValueError, match="no draft-model pages"):
        builder.validate(decl=decl, transfer_page_size=G, packed_draft_device_pools=(object(),))
    with pytest.raises(ValueError, match="Unsupported page_size 128"):
        builder.validate(decl=decl, transfer_page_size=128, packed_draft_device_pools=())
    dummy = SimpleNamespace()
    with pytest.raises(ValueError, match="no side pools"):
        KVarNCacheController.allocate_host_transfers(dummy, indices, extra_pools=[object()])
    with pytest.raises(NotImplementedError, match="loads into pages it allocates"):
        KVarNCacheController.load(dummy, indices, device_indices=indices)
    assert KVarNStackStrategy().matches(server.pool, set())
    with pytest.raises(ValueError, match="full-attention KV only"):
        KVarNStackStrategy().build(
            cache=SimpleNamespace(components={"FULL": 0, "SWA": 1}), kvcache=server.pool,
            params=None, server_args=None, load_cache_event=None,
        )  # fmt: skip


def test_prefetched_pages_are_sinks_at_the_first_sequence_positions():
    from types import SimpleNamespace

    from kvarn_sglang.serving.hicache import KVarNCacheController

    def controller(sink_pages):
        cfg = SimpleNamespace(sink_pages=sink_pages)
        pool = SimpleNamespace(config=cfg)
        group = SimpleNamespace(anchor_entry=SimpleNamespace(host_pool=pool))
        return SimpleNamespace(page_size=G, mem_pool_host=group, host_pool=pool)

    def sinks(sink_pages, start, tokens):
        op = SimpleNamespace(storage_start=start, prefetch_kv_page_offset=0)
        return KVarNCacheController._prefetch_sinks(controller(sink_pages), op, tokens)

    assert sinks(1, 0, 3 * G) == [0]
    assert sinks(2, 0, 3 * G) == [0, 1]
    assert sinks(2, G, 3 * G) == [0]  # the second page of the sequence
    assert sinks(1, G, 3 * G) == []
    assert sinks(0, 0, 3 * G) == []


if __name__ == "__main__":
    test_pages_come_back_from_host_byte_for_byte_with_sinks_in_their_own_slots(1, _filled())
