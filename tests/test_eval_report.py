"""Tables, JSON and plot of ``kvarn-sglang eval`` (``kvarn_sglang.eval.report``)."""

from __future__ import annotations

import json

import pytest

from kvarn_sglang.eval.report import (
    curve_summary,
    format_curve_table,
    format_table,
    plot_curves,
    result_from_json,
    result_to_json,
)
from kvarn_sglang.eval.run import EvalResult, MethodResult


def _row(name, accumulated, static, divergence=(5, 7)):
    return MethodResult(
        method=name,
        k_bits=2,
        v_bits=2,
        page_size=4,
        bits_per_element=2.5,
        bytes_per_token_per_head=40.0,
        compression=6.4,
        ppl=11.0,
        delta_ppl=1.0,
        kl=0.25,
        top1=0.8,
        divergence=list(divergence),
        divergence_margin=[0.5] * len(divergence),
        accumulated=accumulated,
        static=static,
        accumulated_per_layer=[0.1, 0.2],
        static_per_layer=[0.1, 0.1],
    )


def _result(rows):
    return EvalResult(
        tokens=24,
        scored_from=8,
        reference_ppl=10.0,
        bucket=4,
        positions=[0, 4, 8, 12, 16, 20],
        sink_pages=1,
        gen_tokens=9,
        gen_mode="forced",
        prompt_tokens=[3, 4],
        reference_generations=[[1, 2], [3]],
        reference_margin_median=[1.0, 2.0],
        seconds={"reference forward": 1.0},
        rows=rows,
    )


def test_curve_summary_uses_only_buckets_that_read_quantized_pages():
    row = _row("kivi2", [0.0, 0.0, 1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    c = curve_summary(_result([row]), row)
    assert c["static"] == 1.0 and c["accumulated"] == 3.0
    assert c["amplification"] == 3.0 and c["growth"] == 6.0  # last bucket / first bucket
    table = format_curve_table(_result([row]))
    assert "| kivi2 | 1.00e+00 | 3.00e+00 | 3.00x | 6.00x |" in table


def test_format_table_rows_and_missing_generation():
    rows = [_row("k2v2_g64", [0.0] * 6, [0.0] * 6), _row("int4", [0.0] * 6, [0.0] * 6, ())]
    table = format_table(_result(rows)).splitlines()
    assert len(table) == 4
    assert table[2] == (
        "| k2v2_g64 | 2/2 | 2.50 | 40.0 | 6.40x | 11.000 | +1.000 | 0.2500 | 80.00 | 5 / 7 of 9 |"
    )
    assert table[3].endswith("| - |")


def test_json_round_trip_keeps_every_field():
    result = _result([_row("kivi2", [0.0, 0.0, 1.0, 2.0, 3.0, 6.0], [0.5] * 6)])
    data = json.loads(json.dumps(result_to_json(result, {"command": "x", "model": "m"})))
    assert data["command"] == "x" and data["rows"][0]["method"] == "kivi2"
    assert result_from_json(data) == result


def test_result_from_json_rejects_unknown_row_fields():
    data = result_to_json(_result([_row("kivi2", [0.0] * 6, [0.0] * 6)]), {})
    data["rows"][0]["surprise"] = 1
    with pytest.raises(TypeError):
        result_from_json(data)


def test_plot_curves_writes_a_png(tmp_path):
    rows = [
        _row("k2v2_g64", [0.0, 0.0, 1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]),
        _row("kivi2", [0.0, 0.0, 2.0, 3.0, 4.0, 8.0], [0.0, 0.0, 1.5, 1.5, 1.5, 1.5]),
    ]
    plot_curves(_result(rows), tmp_path / "sub" / "p.png", "title")
    assert (tmp_path / "sub" / "p.png").read_bytes()[:4] == b"\x89PNG"


if __name__ == "__main__":
    test_curve_summary_uses_only_buckets_that_read_quantized_pages()
