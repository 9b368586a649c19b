"""What a KVarN request hands over in PD disaggregation, and its host backup (CPU, no server):
which pages travel fp16 and which packed (``serving.pd``), the layout both servers must
share, the slots a request lists, and a retracted request's pages through host memory and
back into other pages (``serving.retraction_backup``)."""

from __future__ import annotations

import sys

import pytest
import torch

from kvarn_sglang.format.config import get_preset
from kvarn_sglang.serving.page_store import PageStore
from kvarn_sglang.serving.pages import pass_pages
from kvarn_sglang.serving.pd import (
    fp16_page_positions,
    layout_mismatch,
    packed_buffer_infos,
    packed_page_mask,
    pd_layout,
    request_slots,
    slot_buffer_infos,
)
from kvarn_sglang.serving.retraction_backup import backup_pages, restore_pages

G = 64


@pytest.mark.parametrize(
    "start, total, sink, fp16",
    [
        (0, 5, 1, [0]),  # shorter than the sink page: the sink is the partial last page too
        (0, G, 1, [0]),
        (0, G + 1, 1, [0, 1]),
        (0, 3 * G, 1, [0]),  # ends on a page boundary: no partial page
        (0, 3 * G + 7, 1, [0, 3]),
        (0, 3 * G + 7, 2, [0, 1, 3]),
        (0, 3 * G + 7, 0, [3]),
        (2 * G, 3 * G + 7, 1, [3]),  # the decode server holds a prefix past the sink
    ],
)
def test_fp16_pages_are_sinks_and_the_partial_last_page(start, total, sink, fp16):
    assert fp16_page_positions(start, total, G, sink) == fp16
    mask = packed_page_mask(start, total, G, sink)
    assert len(mask) == -(-total // G) - start // G
    assert [j for j, packed in enumerate(mask, start // G) if not packed] == fp16


def test_fp16_pages_are_the_pages_a_decode_preallocation_gives_slots():
    """The decode server's allocator decides slots with ``pages.pass_pages`` from the same
    lengths: the two lists must agree, or slots would pair with the wrong pages."""
    for total in (1, 5, G - 1, G, G + 1, 2 * G, 5 * G + 3):
        for sink in (0, 1, 2):
            decided = pass_pages([0], [total], G, sink).new_slot_rows
            assert [r // G for r in decided] == fp16_page_positions(0, total, G, sink), total


def test_handover_rejects_unaligned_starts():
    with pytest.raises(ValueError, match="Invalid handover"):
        fp16_page_positions(3, 100, G, 1)
    with pytest.raises(ValueError, match="Invalid handover"):
        fp16_page_positions(0, 0, G, 1)


def test_layout_mismatch_names_both_values():
    ours = pd_layout(get_preset("k4v2_g128", head_dim=64), torch.bfloat16)
    assert layout_mismatch(ours, ours) is None
    theirs = pd_layout(get_preset("k2v2_g128", head_dim=64, sink_pages=2), torch.bfloat16)
    message = layout_mismatch(theirs, ours)
    assert "--kvarn-preset: prefill k2v2_g128, decode k4v2_g128" in message
    assert "--kvarn-sink-pages: prefill 2, decode 1" in message
    assert "--page-size" not in message.split("(")[1].split(")")[0]  # equal: not listed
    g64 = pd_layout(get_preset("k4v2_g64", head_dim=64), torch.bfloat16)
    assert "--page-size: prefill 64, decode 128" in layout_mismatch(g64, ours)
    fp16 = pd_layout(get_preset("k4v2_g128", head_dim=64), torch.float16)
    assert "--dtype: prefill float16, decode bfloat16" in layout_mismatch(fp16, ours)
    no_kvarn = layout_mismatch(None, ours, "auto")
    assert "does not run --kv-cache kvarn (--kv-cache-dtype auto)" in no_kvarn


def _store(num_pages: int = 12, num_slots: int = 6, layers: int = 2, heads: int = 2):
    cfg = get_preset("k4v2_g64", head_dim=64)
    return PageStore(
        cfg, num_pages=num_pages, num_slots=num_slots, layer_num=layers, head_num=heads,
        dtype=torch.float16, device="cpu",
    )  # fmt: skip


def test_buffer_infos_describe_whole_pages_and_slots():
    store = _store()
    ptrs, lens, items = packed_buffer_infos(store)
    assert ptrs == [t.data_ptr() for t in store.packed] and len(ptrs) == 2
    assert items == [2 * store.config.page_bytes] * 2  # one page of both KV heads
    assert lens == [12 * items[0]] * 2
    ptrs, lens, items = slot_buffer_infos(store)
    assert len(ptrs) == 4  # K of every layer, then V
    assert ptrs[2] == store.slot_v[0].data_ptr()
    assert items == [G * 2 * 64 * 2] * 4


def _request(store, pages: list[int], tokens: int, sink: int = 1) -> torch.Tensor:
    """Token slots of a request on ``pages`` holding ``tokens`` tokens, with slots assigned
    as the allocator assigns them, and distinct K/V written into them and the packed pages."""
    row = torch.cat([torch.arange(p * G, (p + 1) * G) for p in pages])
    fp16 = fp16_page_positions(0, tokens, G, sink)
    store.assign_slots(torch.tensor([pages[j] for j in fp16]))
    for layer in range(len(store.packed)):
        for j, page in enumerate(pages):
            slot = store.page_slot[page]
            if j in fp16:
                store.slot_k[layer][slot] = torch.randn(G, 2, 64).half()
                store.slot_v[layer][slot] = torch.randn(G, 2, 64).half()
            else:
                store.packed[layer][page] = torch.randint(0, 255, store.packed[layer][page].shape)
    return row


def test_request_slots_lists_the_fp16_pages_slots_in_order():
    store = _store()
    row = _request(store, [5, 2, 9, 7], tokens=3 * G + 10)
    slots = request_slots(store, row, fp16_page_positions(0, 3 * G + 10, G, 1), G)
    assert slots == [int(store.page_slot[5]), int(store.page_slot[7])]
    with pytest.raises(RuntimeError, match=r"pages \[1\] of the request hold no fp16 slot"):
        request_slots(store, row, [1], G)


@pytest.mark.parametrize("tokens", [10, G, 3 * G, 3 * G + 10])
def test_retraction_backup_restores_every_page_into_other_pages(tokens):
    store = _store()
    pages = [5, 2, 9, 7][: -(-tokens // G)]
    row = _request(store, pages, tokens)
    n = len(pages)
    indices = row[:tokens]
    before = {
        "packed": [t[pages].clone() for t in store.packed],
        "k": [t[store.page_slot[pages]].clone() for t in store.slot_k],
    }
    backup = backup_pages(store, indices)
    store.forget_pages(torch.tensor(pages))  # the request is retracted: its pages are freed
    assert store.free_slots == store.num_slots
    new_pages = [11, 3, 4, 8][:n]
    new_row = _request(store, new_pages, tokens)  # resumed: new pages, new slots
    restore_pages(store, backup, new_row[:tokens])
    fp16 = fp16_page_positions(0, tokens, G, 1)
    for layer in range(2):
        for j in range(n):
            if j in fp16:
                got = store.slot_k[layer][store.page_slot[new_pages[j]]]
                assert torch.equal(got, before["k"][layer][j]), (tokens, layer, j)
            else:
                assert torch.equal(store.packed[layer][new_pages[j]], before["packed"][layer][j])


def test_retraction_restore_rejects_other_slot_pages():
    store = _store()
    backup = backup_pages(store, _request(store, [5, 2, 9], 2 * G + 3)[: 2 * G + 3])
    other = _request(store, [1, 4, 6], 2 * G)  # no partial page: one slot page fewer
    with pytest.raises(RuntimeError, match="tokens were backed up"):
        restore_pages(store, backup, other[: 2 * G])
    with pytest.raises(RuntimeError, match="fp16 pages"):
        restore_pages(store, backup, other[: 2 * G + 3])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
