from __future__ import annotations

import json

import pytest

from kvarn_sglang.eval.cli import main
from kvarn_sglang.eval.models import load_model


def test_presets_lists_every_preset_and_the_default_layout(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "k4v2_g128: 13824 B/page/head, 108 B/token/head" in out
    assert "k_codes" in out and "v_norm" in out


def test_load_model_rejects_missing_paths():
    with pytest.raises(ValueError, match="does not exist"):
        load_model("/nonexistent/model")


def test_quant_error_reports_clean_errors(capsys):
    assert main(["quant-error", "--methods", "nope", "--model", "/nonexistent"]) == 2
    assert "kvarn-sglang: error: Model path" in capsys.readouterr().err


@pytest.mark.slow
def test_quant_error_end_to_end_on_smollm2(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        [
            "quant-error",
            "--tokens",
            "384",
            "--methods",
            "fp16,kivi2,k2v2_g128",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "| k2v2_g128 | 2 | 2 |" in table
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert result["tokens"] == 384 and set(rows) == {"fp16", "kivi2", "k2v2_g128"}
    assert rows["fp16"]["attn_err"] < 1e-3
    assert 0 < rows["k2v2_g128"]["attn_err"] < 1
    assert rows["k2v2_g128"]["bytes_per_token_per_head"] == 41.0  # head_dim 64


if __name__ == "__main__":
    test_load_model_rejects_missing_paths()
