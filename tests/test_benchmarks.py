"""The GPU benchmarks run end to end on tiny shapes (Triton interpreter), so they cannot rot."""

from __future__ import annotations

import json

from benchmarks import bench_commit, bench_decode, bench_prefill, bench_stress


def test_bench_decode_smoke(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert bench_decode.main(["--smoke", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert {"kvarn", "fp16-paged"} <= set(row) and row["context"] == 300
    # 300 tokens in pages of 128: 1 packed page + sink and own page in fp16, 1 KV head, 2 requests.
    assert row["kvarn"]["bytes"] == 2 * (13824 + 2 * 128 * 128 * 4)
    assert row["fp16-paged"]["bytes"] == 2 * 3 * 128 * 128 * 4
    assert result["git_commit"] and result["device"].startswith("cpu")
    assert "| 300 | 2 | 4 |" in capsys.readouterr().out


def test_bench_commit_smoke(tmp_path):
    out = tmp_path / "commit.json"
    assert bench_commit.main(["--smoke", "--output", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["batch"] == 2 and row["commit_us_per_step"] > 0
    assert row["commit_us_per_step"] == row["commit_us_one_layer"] * 2 / 128
    assert set(row["decode_step_attention_us"]) == {"none", "inline", "side"}
    assert all(us > 0 for us in row["decode_step_attention_us"].values())


def test_bench_prefill_smoke(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    assert bench_prefill.main(["--smoke", "--output", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert (row["prefix"], row["new"], row["gqa"]) == (256, 3, 4)
    assert row["kvarn"]["us"] > 0 and row["sglang-triton"]["us"] > 0  # sglang imports on CPU
    assert "| 256 | 3 | 4 |" in capsys.readouterr().out


def test_bench_stress_smoke(tmp_path, capsys):
    out = tmp_path / "stress.json"
    assert bench_stress.main(["--steps", "60", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["stats"]["invariant_checks"] == 60 and result["seed"] == 0
    assert "every invariant held" in capsys.readouterr().out


if __name__ == "__main__":
    test_bench_commit_smoke(__import__("pathlib").Path("/tmp"))
