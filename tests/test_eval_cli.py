"""``kvarn-sglang eval`` end to end: a tiny saved model on CPU, and SmolLM2 (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_llama import byte_tokenizer, one_thread, save_tiny_model, tiny_llama

from kvarn_sglang.eval.cli import main
from kvarn_sglang.eval.run import EvalSettings, run_eval

_ = one_thread  # autouse fixture: tiny ops on 2 shared cores run fastest single-threaded
TEXT = (
    "The river ran quietly past the mill, where the miller counted sacks of grain every "
    "morning. Children raced along the bank, and the ferryman waved to them from his boat. "
) * 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    text, prompts = root / "text.txt", root / "prompts.txt"
    text.write_text(TEXT)
    prompts.write_text("Once upon a time\n\nThe ferryman said\n")
    return {"model": save_tiny_model(root / "model"), "text": text, "prompts": prompts}


def _args(files, out, *extra):
    return [
        "eval",
        "--model",
        str(files["model"]),
        "--text",
        str(files["text"]),
        "--prompts",
        str(files["prompts"]),
        "--page-size",
        "64",
        "--tokens",
        "300",
        "--gen-tokens",
        "150",
        "--no-progress",
        "--output",
        str(out),
        *extra,
    ]


def test_eval_writes_results_table_and_plot(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(files, out, "--methods", "fp16,int4,kivi2,k2v2_g64")) == 0
    stdout = capsys.readouterr().out
    assert "| int4 | 4/4 | 4.50 | 72.0 | 3.56x |" in stdout
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 * (2 + 4)  # metrics and curve tables: header, separator, 4 rows
    assert any(line.startswith("| kivi2 | ") and line.endswith("x |") for line in table[6:])
    result = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["fp16", "int4", "kivi2", "k2v2_g64"]
    assert result["tokens"] == 300 and result["scored_from"] == 128
    assert result["prompt_tokens"] == [16, 17] and result["positions"] == [0, 64, 128, 192, 256]
    assert rows["fp16"]["kl"] < 1e-6 and rows["fp16"]["top1"] == 1.0
    assert rows["kivi2"]["kl"] > rows["int4"]["kl"] > rows["fp16"]["kl"]
    for r in rows.values():
        assert r["accumulated"][:2] == [0.0, 0.0] and r["static"][:2] == [0.0, 0.0]
        assert min(r["accumulated"][2:] + r["static"][2:]) > 0
        assert len(r["divergence"]) == 2 and all(134 - 22 <= d <= 150 for d in r["divergence"])
        for d, margin in zip(r["divergence"], r["divergence_margin"], strict=True):
            assert (margin is None) == (d == 150) and (margin is None or margin >= 0)
    assert rows["fp16"]["divergence"] == [150, 150]
    assert len(result["reference_texts"]) == 2 and len(result["reference_margin_median"]) == 2
    assert result["command"].startswith("kvarn-sglang") and "torch" in result["versions"]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| kivi2 |" in (out / "table.md").read_text()


def test_forced_and_incremental_generation_agree():
    model, tok = tiny_llama(), byte_tokenizer()
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :200]
    prompts = [tok(p, return_tensors="pt").input_ids for p in ("Once upon a time", "Hello")]
    results = [
        run_eval(
            model,
            ids,
            prompts,
            EvalSettings(["kivi2", "int4"], page_size=64, gen_tokens=180, gen_mode=mode),
            progress=False,
        )
        for mode in ("forced", "incremental")
    ]
    forced, incremental = ([r.divergence for r in res.rows] for res in results)
    assert forced == incremental
    assert all(d >= 128 - 16 for row in forced for d in row)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "int4,nope"], "Unknown method 'nope'"),
        (["--methods", ","], "No methods given"),
        (["--methods", "int4", "--tokens", "150"], "Too few tokens (150)"),
        (["--methods", "int4", "--model", "/nonexistent/model"], "does not exist"),
        (["--methods", "int4", "--text", "/nonexistent.txt"], "Text file"),
        (["--methods", "int4", "--prompts", "/nonexistent.txt"], "Prompts file"),
        (["--methods", "int4", "--tokens", "0"], "Unsupported --tokens 0"),
    ],
)
def test_eval_rejects_bad_arguments_with_clear_errors(files, tmp_path, capsys, extra, message):
    assert main([*_args(files, tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert "kvarn-sglang: error:" in err and message in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_run_eval_without_generation_reports_no_divergence():
    model, ids = tiny_llama(), torch.randint(0, 256, (1, 200))
    prompt = torch.zeros(1, 4, dtype=torch.long)
    result = run_eval(
        model, ids, [prompt], EvalSettings(["int4"], page_size=64, gen_tokens=0), progress=False
    )
    assert result.rows[0].divergence == [] and result.reference_generations == []
    assert result.rows[0].kl > 0 and len(result.rows[0].accumulated) == 4


def test_run_eval_rejects_bad_generation_settings():
    model, ids = tiny_llama(), torch.zeros(1, 200, dtype=torch.long)
    with pytest.raises(ValueError, match="Unsupported gen_mode 'beam'"):
        run_eval(model, ids, [], EvalSettings(["int4"], page_size=64, gen_mode="beam"))
    with pytest.raises(ValueError, match="Unsupported gen_tokens -1"):
        run_eval(model, ids, [], EvalSettings(["int4"], page_size=64, gen_tokens=-1))


@pytest.mark.slow
def test_eval_end_to_end_on_smollm2(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The old lighthouse keeper climbed the stairs, and\n")
    out = tmp_path / "out"
    args = ["eval", "--tokens", "512", "--methods", "fp16,kivi2,k2v2_g128"]
    args += ["--gen-tokens", "260", "--prompts", str(prompts), "--output", str(out)]
    assert main([*args, "--no-progress"]) == 0
    assert "| k2v2_g128 | 2/2 | 2.56 | 41.0 |" in capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert result["tokens"] == 512 and result["model_config"]["kv_heads"] == 3
    assert rows["fp16"]["kl"] < 1e-4 and rows["fp16"]["top1"] > 0.99
    assert rows["k2v2_g128"]["kl"] > 10 * rows["fp16"]["kl"]
    assert 1 < result["reference_ppl"] < 1000
    assert min(rows["kivi2"]["accumulated"][2:]) > 0


if __name__ == "__main__":
    test_forced_and_incremental_generation_agree()
