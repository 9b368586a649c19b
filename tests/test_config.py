from __future__ import annotations

import dataclasses

import pytest

from kvarn_sglang.format.config import DEFAULT_PRESET, PRESETS, KVarNConfig, get_preset


@pytest.mark.parametrize(
    "name, bytes_per_token, page_bytes",
    [
        ("k4v2_g128", 108, 13824),
        ("k4v4_g128", 140, 17920),
        ("k2v2_g128", 76, 9728),
        ("k4v2_g64", 114, 7296),
    ],
)
def test_preset_bytes_match_the_spec(name, bytes_per_token, page_bytes):
    cfg = get_preset(name, head_dim=128)
    assert cfg.bytes_per_token == bytes_per_token
    assert cfg.page_bytes == page_bytes
    assert cfg.compression == pytest.approx(512 / bytes_per_token)


def test_default_preset_and_required_presets_exist():
    assert DEFAULT_PRESET == "k4v2_g128"
    for name in ("k4v2_g128", "k4v4_g128", "k4v2_g64", "k4v4_g64", "k2v2_g128", "k2v4_g128"):
        assert PRESETS[name].name == name
    assert get_preset().sinkhorn_iters == 8 and get_preset().sink_pages == 1
    assert get_preset().clip_quantile == 0.0


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_layout_metadata_matches_the_spec(name, head_dim):
    cfg = get_preset(name, head_dim=head_dim)
    g, d = cfg.page_size, head_dim
    fields = {f.name: f for f in cfg.layout.fields}
    assert fields["k_codes"].nbytes == d * g * cfg.k_bits // 8
    assert fields["v_codes"].nbytes == d * g * cfg.v_bits // 8
    k_meta = sum(fields[n].nbytes for n in ("k_scale", "k_zero", "k_norm"))
    v_meta = sum(fields[n].nbytes for n in ("v_scale", "v_zero", "v_norm"))
    assert k_meta == 2 * (2 * d + g) and v_meta == 2 * (d + 2 * g)
    assert cfg.page_bytes == fields["k_codes"].nbytes + fields["v_codes"].nbytes + k_meta + v_meta
    offsets = [f.offset for f in cfg.layout.fields]
    assert offsets == sorted(offsets) and all(o % 16 == 0 for o in offsets)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset().k_bits = 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k_bits": 3}, "Unsupported k_bits 3"),
        ({"v_bits": 8}, "Unsupported v_bits 8"),
        ({"page_size": 32}, "Unsupported page_size 32"),
        ({"head_dim": 80}, "Unsupported head_dim 80: KVarN needs a power of two in {64, 128, 256}"),
        ({"head_dim": 512}, "Unsupported head_dim 512"),
        ({"sinkhorn_iters": -1}, "Unsupported sinkhorn_iters -1"),
        ({"sink_pages": -1}, "Unsupported sink_pages -1"),
        ({"clip_quantile": 0.5}, "Unsupported clip_quantile 0.5"),
    ],
)
def test_config_rejects_unsupported_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        KVarNConfig(**kwargs)


def test_get_preset_rejects_unknown_name():
    with pytest.raises(ValueError, match="Unknown KVarN preset 'k3v3_g128'"):
        get_preset("k3v3_g128")


if __name__ == "__main__":
    test_preset_bytes_match_the_spec("k4v2_g128", 108, 13824)
