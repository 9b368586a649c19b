from __future__ import annotations

import pytest
import torch

from kvarn_sglang.layout import PageLayout, pack_codes, tile_layout, unpack_codes


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_is_exact(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_packing_is_little_endian_within_a_byte(bits):
    per = 8 // bits
    codes = torch.zeros(1, 2 * per, dtype=torch.uint8)
    codes[0, 1] = 1  # element 1 -> byte 0 at shift `bits`
    codes[0, per] = 2**bits - 1  # element `per` -> byte 1 at shift 0
    packed = pack_codes(codes, bits)
    assert packed.tolist() == [[1 << bits, 2**bits - 1]]


def test_pack_rejects_unsupported_bits():
    with pytest.raises(ValueError, match="Unsupported bits 3"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="Unsupported bits 1"):
        unpack_codes(torch.zeros(8, dtype=torch.uint8), 1)


def test_pack_rejects_ragged_rows():
    with pytest.raises(ValueError, match="Invalid shape of codes"):
        pack_codes(torch.zeros(6, dtype=torch.uint8), 2)


def test_record_pack_unpack_round_trip():
    layout = tile_layout(
        page_size=64, head_dim=64, k_bits=4, v_bits=2, k_per_channel=True, normalized=True
    )
    parts = {}
    for f in layout.fields:
        if f.dtype == torch.uint8:
            parts[f.name] = torch.randint(0, 256, (2, 3, *f.shape), dtype=torch.uint8)
        else:
            parts[f.name] = torch.randn(2, 3, *f.shape).to(f.dtype)
    records = layout.pack(parts)
    assert records.shape == (2, 3, layout.page_bytes) and records.dtype == torch.uint8
    back = layout.unpack(records)
    for name, t in parts.items():
        assert torch.equal(back[name], t), name


def test_record_pack_rejects_missing_and_misshapen_fields():
    layout = PageLayout.build([("a", torch.float16, (4,)), ("b", torch.uint8, (8,))], 4, 4)
    with pytest.raises(ValueError, match="Invalid fields"):
        layout.pack({"a": torch.zeros(1, 4, dtype=torch.float16)})
    with pytest.raises(ValueError, match="Invalid shape of b"):
        layout.pack(
            {"a": torch.zeros(1, 4, dtype=torch.float16), "b": torch.zeros(1, 7, dtype=torch.uint8)}
        )


def test_record_unpack_rejects_wrong_size():
    layout = PageLayout.build([("a", torch.float16, (4,))], 4, 4)
    with pytest.raises(ValueError, match=r"Invalid shape of records: expected \[..., 16\] uint8"):
        layout.unpack(torch.zeros(2, 15, dtype=torch.uint8))


if __name__ == "__main__":
    test_pack_unpack_round_trip_is_exact(2)
