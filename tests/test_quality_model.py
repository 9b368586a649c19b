"""KVarN's fidelity on a real model, asserted: a change that makes a preset worse fails here.

SmolLM2-135M (the Hugging Face export the servers use, bf16 weights run in fp32 on CPU) reads
the first 768 tokens of WikiText-2 test (``../shared/data``) teacher-forced, through every
method's decode-consistent quantized attention (each page quantized once it is full, the sink
page fp16, a token's own page fp16; errors propagate through layers and time, which is the
paper's error-accumulation argument): ``benchmarks.harness.fidelity``. Each method's KL to the
unquantized model, top-1 agreement and perplexity over the positions that read a quantized
page are compared with the published figures, ``benchmarks/results/quality_smollm2.json``
(``python -m benchmarks.bench_quality``; rendered in ``docs/quality.md``).

The CPU path is deterministic (the same figures on every run; 1 and 2 torch threads agree to
7 significant digits), so the bounds are tight: KL may exceed its figure by ``KL_SLACK`` (1%),
perplexity by ``PPL_SLACK`` (0.2%), and top-1 may lose ``TOP1_SLACK_TOKENS`` of its 511
positions. A KL more than ``IMPROVED`` below its figure fails too: the published figure is
then stale (rerun the benchmark and commit its JSON).
"""

from __future__ import annotations

import json

import pytest
from quality_data import wikitext_path

from benchmarks.harness.common import ROOT
from benchmarks.harness.fidelity import METHODS, SCORED_FROM, TOKENS, load_bench, measure
from benchmarks.harness.server_process import SMOLLM2_HF

pytestmark = [pytest.mark.quality, pytest.mark.slow, pytest.mark.xdist_group("quality_model")]

RESULTS = ROOT / "benchmarks" / "results" / "quality_smollm2.json"
KL_SLACK, PPL_SLACK, TOP1_SLACK_TOKENS = 0.01, 0.002, 2
IMPROVED = 0.05


@pytest.fixture(scope="module")
def published():
    data = json.loads(RESULTS.read_text())
    assert data["tokens"] == TOKENS and data["scored_from"] == SCORED_FROM
    assert list(data["figures"]) == list(METHODS)
    return data


@pytest.fixture(scope="module")
def bench():
    text = wikitext_path()
    if not (SMOLLM2_HF / "model.safetensors").exists():
        pytest.fail(f"{SMOLLM2_HF} is missing: run scripts/setup_env.sh (it exports SmolLM2)")
    return load_bench(text)


def test_reference_perplexity_is_the_published_one(bench, published):
    assert abs(bench.reference_ppl - published["reference_ppl"]) < 1e-4, bench.reference_ppl


@pytest.mark.parametrize("name", METHODS)
def test_fidelity_on_smollm2_wikitext2_is_no_worse_than_published(bench, published, name):
    got = measure(bench, name)
    fig = published["figures"][name]
    line = (
        f"{name}: KL {got.kl:.6f} (published {fig['kl']}), top-1 {got.top1:.6f} "
        f"({fig['top1']}), ppl {got.ppl:.4f} ({fig['ppl']})"
    )
    assert got.count == TOKENS - 1 - SCORED_FROM
    assert got.kl <= fig["kl"] * (1 + KL_SLACK), f"KL got worse: {line}"
    assert got.top1 >= fig["top1"] - TOP1_SLACK_TOKENS / got.count, f"top-1 got worse: {line}"
    assert got.ppl <= fig["ppl"] * (1 + PPL_SLACK), f"perplexity got worse: {line}"
    assert got.kl >= fig["kl"] * (1 - IMPROVED), f"better than published, rerun: {line}"


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-k", "k4v2_g128"])
