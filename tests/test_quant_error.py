from __future__ import annotations

import pytest
import torch

from kvarn_sglang.eval.kv_capture import LayerQKV
from kvarn_sglang.eval.quant_error import dequantized_read, format_table, measure_methods
from kvarn_sglang.quant.baselines import get_method


def _layers(t=3 * 64, n=2, d=64):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        q = torch.randn(t, 4, d, generator=gen)
        k = torch.randn(t, 2, d, generator=gen) * 2
        v = torch.randn(t, 2, d, generator=gen)
        out.append(LayerQKV(q, k, v, d**-0.5))
    return out


def test_dequantized_read_leaves_sink_and_partial_pages_untouched():
    layer = _layers(t=3 * 64 + 10)[0]
    method = get_method("kivi2", head_dim=64, page_size=64)
    k_read, _v_read, span = dequantized_read(method, layer.k, layer.v, sink_pages=1)
    assert span == slice(64, 3 * 64)
    assert torch.equal(k_read[:64], layer.k[:64]) and torch.equal(k_read[192:], layer.k[192:])
    assert not torch.allclose(k_read[span], layer.k[span], atol=1e-3)


def test_errors_order_by_bits_and_fp16_is_near_exact():
    rows = measure_methods(["fp16", "int8", "int4", "kivi2"], _layers(), page_size=64)
    err = {r.method: r for r in rows}
    assert err["fp16"].attn_err < 1e-3 and err["fp16"].k_err < 1e-3
    assert err["int8"].attn_err < err["int4"].attn_err < err["kivi2"].attn_err
    assert err["kivi2"].bytes_per_token_per_head == 40.0  # 32 B of codes + 8 B of metadata
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| kivi2 | 2 | 2 |" in table


def test_measure_rejects_too_short_sequences():
    with pytest.raises(ValueError, match="Too few tokens"):
        measure_methods(["fp16"], _layers(t=100), page_size=64)


if __name__ == "__main__":
    test_errors_order_by_bits_and_fp16_is_near_exact()
