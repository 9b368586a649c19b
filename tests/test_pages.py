"""A page's life: what ``pages.pass_pages`` decides for a pass, worked by hand."""

from __future__ import annotations

import pytest

from kvarn_sglang.serving.pages import pass_pages, sink_page_range


def test_prefill_of_two_and_a_half_pages():
    # 300 new tokens, G 128, one sink page: page 0 is a sink (slot, never committed), page 1
    # is filled by this pass alone (committed from the new tokens), page 2 stays partial.
    p = pass_pages([0], [300], 128, 1)
    assert p.new_slot_rows == [0, 256] and p.new_sink_rows == [0]
    assert p.from_slots == [] and p.direct == [(0, 1)]
    assert p.direct_rows == [list(range(128, 256))]


def test_chunk_that_completes_a_partial_prefix_page_commits_it_from_its_slot():
    # A prefix of 200 tokens (page 1 half full, in its slot), 100 new: page 1 completes from
    # its slot; page 2 is new and partial and needs a slot.
    p = pass_pages([200], [300], 128, 1)
    assert p.from_slots == [(0, 1)] and p.direct == []
    assert p.new_slot_rows == [56] and p.new_sink_rows == []


def test_decode_step_completing_a_page_and_a_decode_step_opening_one():
    # Batch of two decode steps: request 0 writes token 255 (completes page 1 from its slot),
    # request 1 writes token 256 (opens page 2, which needs a slot).
    p = pass_pages([255, 256], [256, 257], 128, 1)
    assert p.from_slots == [(0, 1)] and p.direct == []
    assert p.new_slot_rows == [1] and p.new_sink_rows == []


def test_sink_pages_are_never_committed_and_take_slots_even_when_full():
    p = pass_pages([0], [384], 128, 2)
    assert p.new_slot_rows == [0, 128] and p.new_sink_rows == [0, 128]
    assert p.direct == [(0, 2)] and p.from_slots == []


def test_rows_count_the_new_tokens_of_all_requests_concatenated():
    # Request 0 brings 10 new tokens (rows 0-9), request 1 a full page after a cached one.
    p = pass_pages([0, 128], [10, 256], 128, 1)
    assert p.new_slot_rows == [0] and p.new_sink_rows == [0]
    assert p.direct == [(1, 1)] and p.direct_rows == [list(range(10, 138))]


def test_pass_pages_rejects_lengths_that_do_not_grow():
    with pytest.raises(ValueError, match="Invalid lengths"):
        pass_pages([5], [5], 128, 1)
    with pytest.raises(ValueError, match="Invalid lengths"):
        pass_pages([0, 1], [2], 128, 1)


def test_sink_page_range_splits_cached_and_new_sinks():
    assert [list(r) for r in sink_page_range(128, 300, 128, 2)] == [[0], [1]]


if __name__ == "__main__":
    test_prefill_of_two_and_a_half_pages()
