from __future__ import annotations

import pytest
import torch

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.layout import (
    PageLayout,
    TileCodes,
    decode_tiles,
    encode_tiles,
    pack_codes,
    pack_planar,
    tile_layout,
    unpack_codes,
    unpack_planar,
)


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


@pytest.mark.parametrize("bits", [2, 4])
def test_planar_packing_puts_channel_blocks_in_one_byte(bits):
    per, c = 8 // bits, 16
    codes = torch.randint(0, 2**bits, (3, c), dtype=torch.uint8)
    packed = pack_planar(codes, bits)
    assert packed.shape == (3, c * bits // 8)
    assert torch.equal(unpack_planar(packed, bits), codes)
    slot = c // per
    for ch in range(c):  # channel ch -> byte ch % slot, shift (ch // slot) * bits
        got = (packed[:, ch % slot].int() >> ((ch // slot) * bits)) & (2**bits - 1)
        assert torch.equal(got, codes[:, ch].int()), ch


def test_planar_records_store_k_by_token_and_v_by_channel_slot():
    cfg = KVarNConfig(k_bits=4, v_bits=2, page_size=64, head_dim=64)
    layout = cfg.layout
    assert layout.planar
    assert layout.field("k_codes").shape == (64, 32) and layout.field("v_codes").shape == (16, 64)
    k_codes = torch.randint(0, 16, (2, 64, 64), dtype=torch.uint8)  # oriented [D, G]
    v_codes = torch.randint(0, 4, (2, 64, 64), dtype=torch.uint8)  # oriented [G, D]

    def tiles(codes, rows, cols):
        return TileCodes(codes, torch.ones(2, rows).half(), torch.zeros(2, rows).half(),
                         torch.ones(2, cols).half())  # fmt: skip

    records = encode_tiles(tiles(k_codes, 64, 64), tiles(v_codes, 64, 64), layout, 1, 2)
    parts = layout.unpack(records)
    assert torch.equal(parts["k_codes"][0], pack_planar(k_codes.transpose(1, 2), 4))
    assert torch.equal(parts["v_codes"][0], pack_planar(v_codes, 2).transpose(1, 2))
    k_back, v_back = decode_tiles(records, layout)
    assert torch.equal(k_back.codes, k_codes) and torch.equal(v_back.codes, v_codes)


def test_planar_rejects_unsupported_bits_ragged_rows_and_per_token_k():
    with pytest.raises(ValueError, match="Unsupported bits 8"):
        pack_planar(torch.zeros(8, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="Unsupported bits 3"):
        unpack_planar(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="Invalid shape of codes"):
        pack_planar(torch.zeros(6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="Unsupported planar code order with per-token K"):
        tile_layout(
            page_size=64, head_dim=64, k_bits=4, v_bits=2, k_per_channel=False,
            normalized=True, planar=True,
        )  # fmt: skip


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
