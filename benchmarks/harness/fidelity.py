"""The fidelity figures ``pytest -m quality`` asserts (``tests/test_quality_model.py``) and
``benchmarks/bench_quality.py`` publishes: SmolLM2-135M on the first ``TOKENS`` tokens of
WikiText-2 test, every method read through decode-consistent quantized attention
(``kvarn_sglang.eval.attention``), KL to the unquantized model, top-1 agreement and perplexity
over the positions that read a quantized page. One torch thread: the same numbers every run.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness.server_process import SMOLLM2_HF
from kvarn_sglang.format.config import PRESETS

TOKENS = 768  # 6 pages of 128: the sink, 4 quantized pages read by later ones, the last
PAGE_SIZE = 128
SINK_PAGES = 1
SCORED_FROM = (SINK_PAGES + 1) * PAGE_SIZE  # the first position that reads a quantized page
METHODS = (
    "fp8",
    "k4v4_g128",
    "k4v2_g128",
    "k4v2_g128_plus",
    "k2v2_g128_plus",
    "k2v2_g128",
    "kivi2",
)
TEXT_CHARS = 20000  # of the text, tokenized; the first TOKENS tokens are kept


@contextmanager
def one_thread():
    """Run single-threaded and restore the setting afterwards: on tiny tensors intra-op threads
    only add overhead (20x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Bench:
    """The model, the token ids ``[1, TOKENS]`` and the reference log-probabilities."""

    model: object
    ids: torch.Tensor
    ref_logp: torch.Tensor
    reference_ppl: float


def load_bench(text: Path, model_path: Path = SMOLLM2_HF) -> Bench:
    from kvarn_sglang.eval.attention import paged_logits
    from kvarn_sglang.eval.metrics import log_probs, token_metrics
    from kvarn_sglang.eval.models import load_model

    with one_thread():
        model, tokenizer = load_model(str(model_path), dtype=torch.float32)
        ids = tokenizer(text.read_text()[:TEXT_CHARS]).input_ids[:TOKENS]
        if len(ids) != TOKENS:
            raise ValueError(f"Too few tokens in {text}: {len(ids)} < {TOKENS}")
        ids = torch.tensor([ids])
        logits = paged_logits(model, ids, None)
        ref = log_probs(logits)
        ppl = token_metrics(ref, logits, ids[0], SCORED_FROM).ppl
    return Bench(model, ids, ref, ppl)


def measure(bench: Bench, name: str):
    """``TokenMetrics`` of method ``name`` (a KVarN preset reads its own sink pages)."""
    from kvarn_sglang.eval.attention import paged_logits
    from kvarn_sglang.eval.metrics import token_metrics
    from kvarn_sglang.quant.baselines import get_method

    method = get_method(name, head_dim=bench.model.config.head_dim, page_size=PAGE_SIZE)
    sink = PRESETS[name].sink_pages if name in PRESETS else SINK_PAGES
    with one_thread():
        logits = paged_logits(bench.model, bench.ids, method, sink_pages=sink)
    return token_metrics(bench.ref_logp, logits, bench.ids[0], SCORED_FROM)
