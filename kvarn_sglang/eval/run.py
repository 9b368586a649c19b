"""Orchestration of ``kvarn-sglang eval``: every metric of every method on one model.

0. Check: the eval's unquantized reference must be the model's own forward
   (``attention.check_reference`` on the first ``CHECK_TOKENS`` tokens: within fp32
   tolerance of transformers' own attention, else ``ValueError`` naming the feature).
1. Reference: one teacher-forced forward with exact attention over the text,
   keeping each layer's post-RoPE Q/K/V and attention output (before ``o_proj``) and the
   next-token log-probabilities; greedy generations of ``gen_tokens`` tokens per prompt.
2. Per method: one forward with decode-consistent quantized attention over the text
   (perplexity, KL, top-1 agreement, and the "accumulated" error curve: errors propagate
   through layers and time); the "static" curve from the reference Q/K/V of each layer, its
   full pages quantized once, no propagation; tokens generated before the first divergence
   from the reference generation.

Greedy divergence (``gen_mode="forced"``): as long as every earlier token matched, greedy
decoding with the quantized cache sees exactly the reference prefix, and decode-consistent
attention makes one teacher-forced forward over it compute what token-by-token decoding
would; so the first position where the quantized argmax differs from the reference token is
the first divergence. ``gen_mode="incremental"`` decodes token by token with
``PagedQuantizedCache`` instead (slower; the tests check that both agree). With each
divergence the reference's top-1 minus top-2 logit margin at that token is kept: a flip at a
near-tie says little about a method.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from kvarn_sglang.eval.attention import (
    check_reference,
    layer_method,
    paged_attention,
    paged_logits,
    recent_pages_of,
)
from kvarn_sglang.eval.cache import greedy_generate
from kvarn_sglang.eval.metrics import ErrorCurve, first_divergence, log_probs, token_metrics
from kvarn_sglang.eval.quant_error import dequantized_read
from kvarn_sglang.quant.baselines import PageMethod
from kvarn_sglang.quant.page_attention import LayerAttention
from kvarn_sglang.quant.variants import parse_variant

GEN_MODES = ("forced", "incremental")
# Tokens compared with the model's own forward before a run (at least; two of the longest
# sliding window, so that queries past every window are among them).
CHECK_TOKENS = 512


def check_tokens(config) -> int:
    """Tokens ``check_reference`` compares for a model of ``config``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None) or 0
    return max(CHECK_TOKENS, 2 * int(window))


@dataclass
class EvalSettings:
    """What ``run_eval`` measures. ``page_size`` is for non-preset methods and the curve's
    buckets; a KVarN preset brings its own page size."""

    methods: Sequence[str | PageMethod]
    sink_pages: int = 1
    page_size: int = 128
    gen_tokens: int = 384
    gen_mode: str = "forced"


@dataclass
class MethodResult:
    """One method's accuracy against the reference (curves: MAE per bucket, layer mean)."""

    method: str
    k_bits: int
    v_bits: int
    page_size: int
    bits_per_element: float
    bytes_per_token_per_head: float
    compression: float
    ppl: float
    delta_ppl: float
    kl: float
    top1: float
    divergence: list[int]
    divergence_margin: list[float | None]
    accumulated: list[float]
    static: list[float]
    accumulated_per_layer: list[float]
    static_per_layer: list[float]


@dataclass
class EvalResult:
    """Everything ``kvarn-sglang eval`` reports. ``positions``: first token of each bucket."""

    tokens: int
    scored_from: int
    reference_ppl: float
    bucket: int
    positions: list[int]
    sink_pages: int
    gen_tokens: int
    gen_mode: str
    prompt_tokens: list[int]
    reference_generations: list[list[int]] = field(default_factory=list)
    reference_margin_median: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase
    rows: list[MethodResult] = field(default_factory=list)
    # check_reference's finding: tokens, implementation, max |d logit|, tolerance, layers
    reference_check: dict = field(default_factory=dict)


@dataclass
class _Reference:
    q: list[torch.Tensor] = field(default_factory=list)  # per layer [Hq, T, D]
    k: list[torch.Tensor] = field(default_factory=list)  # per layer [Hkv, T, D]
    v: list[torch.Tensor] = field(default_factory=list)
    out: list[torch.Tensor] = field(default_factory=list)  # per layer [Hq, T, D]
    scale: list[float] = field(default_factory=list)
    attn: list[LayerAttention] = field(default_factory=list)

    def __call__(self, layer, q, k, v, out, scale, attn) -> None:
        for store, x in ((self.q, q), (self.k, k), (self.v, v), (self.out, out)):
            store.append(x.detach().float().clone())
        self.scale.append(scale)
        self.attn.append(attn)


def build_methods(
    names: Sequence[str | PageMethod], head_dim: int, page_size: int
) -> list[PageMethod]:
    """``parse_variant`` for every name (any ``get_method`` name, a preset with ``+`` knobs, or
    ``layers:A/B/...`` cycled over layers; a ``PageMethod`` is taken as is); raises
    ``ValueError`` on the first unknown name."""
    if not names:
        raise ValueError(
            "No methods given: expected a comma-separated list such as kivi2,k2v2_g128"
        )
    return [
        n if isinstance(n, PageMethod) else parse_variant(n, head_dim, page_size) for n in names
    ]


def _static_curve(method: PageMethod, ref: _Reference, sink_pages: int, bucket: int, nb: int):
    curve = ErrorCurve(len(ref.q), nb)
    layers = zip(ref.q, ref.k, ref.v, ref.out, ref.scale, ref.attn, strict=True)
    for layer, (q, k, v, out, scale, attn) in enumerate(layers):
        m = layer_method(method, layer)
        k_read, v_read, _ = dequantized_read(m, k.transpose(0, 1), v.transpose(0, 1), sink_pages)
        k_read, v_read = k_read.transpose(0, 1), v_read.transpose(0, 1)
        o = paged_attention(
            q, 0, k_read, v_read, k, v, 0, m.page_size, scale, recent_pages_of(m), attn=attn
        )
        curve.add(layer, o, out, bucket)
    return curve


def _reference_margins(model, prompt: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
    """Reference top-1 minus top-2 logit at each generated position, ``fp32 [len(gen)]``."""
    logits = paged_logits(model, torch.cat([prompt, gen[None, :-1]], 1), None)
    top2 = logits[prompt.shape[1] - 1 :].topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).cpu()


def _divergence(model, method, prompts, ref_gen, settings: EvalSettings) -> list[int]:
    counts = []
    for prompt, gen in zip(prompts, ref_gen, strict=True):
        if settings.gen_mode == "incremental":
            ours = greedy_generate(
                model, prompt, len(gen), method, sink_pages=settings.sink_pages
            ).to(gen.device)
        else:
            seq = torch.cat([prompt, gen[None, :-1]], 1)
            logits = paged_logits(model, seq, method, sink_pages=settings.sink_pages)
            ours = logits[prompt.shape[1] - 1 :].argmax(-1)
        counts.append(first_divergence(ours, gen))
    return counts


def run_eval(
    model,
    input_ids: torch.Tensor,
    prompts: Sequence[torch.Tensor],
    settings: EvalSettings,
    *,
    progress: bool = True,
) -> EvalResult:
    """Measure every method of ``settings`` on ``model``.

    Args:
        input_ids: ``int [1, T]`` the long text (teacher-forced metrics and curves).
        prompts: ``int [1, P_i]`` greedy-generation prompts (may be empty).
    """
    if settings.gen_mode not in GEN_MODES:
        raise ValueError(f"Unsupported gen_mode {settings.gen_mode!r}: expected one of {GEN_MODES}")
    if settings.gen_tokens < 0:
        raise ValueError(f"Unsupported gen_tokens {settings.gen_tokens}: expected >= 0")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    methods = build_methods(settings.methods, head_dim, settings.page_size)
    t, g = input_ids.shape[1], settings.page_size
    scored_from = (settings.sink_pages + 1) * max(m.page_size for m in methods)
    if t < scored_from + max(m.page_size for m in methods):
        raise ValueError(
            f"Too few tokens ({t}): eval needs at least "
            f"{scored_from + max(m.page_size for m in methods)} (sink pages + 2 pages) so that "
            f"some tokens read quantized pages"
        )
    bar = tqdm(total=3 + len(methods), desc="eval", disable=not progress, unit="step")
    clock, seconds = time.perf_counter(), {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name], clock = round(now - clock, 2), now

    bar.set_postfix_str("reference check")
    check = check_reference(model, input_ids[:, : check_tokens(model.config)])
    lap("reference check")
    bar.update()

    bar.set_postfix_str("reference forward")
    ref = _Reference()
    ref_logits = paged_logits(model, input_ids, None, observer=ref)
    ref_logp = log_probs(ref_logits)
    targets = input_ids[0]
    reference_ppl = token_metrics(ref_logp, ref_logits, targets, scored_from).ppl
    del ref_logits
    lap("reference forward")
    bar.update()
    bar.set_postfix_str("reference generation")
    prompts = prompts if settings.gen_tokens > 0 else []
    ref_gen = [greedy_generate(model, p, settings.gen_tokens, None) for p in prompts]
    margins = [_reference_margins(model, p, g) for p, g in zip(prompts, ref_gen, strict=True)]
    lap("reference generation")
    bar.update()
    nb = -(-t // g)
    result = EvalResult(
        tokens=t,
        scored_from=scored_from,
        reference_ppl=reference_ppl,
        bucket=g,
        positions=[b * g for b in range(nb)],
        sink_pages=settings.sink_pages,
        gen_tokens=settings.gen_tokens,
        gen_mode=settings.gen_mode,
        prompt_tokens=[int(p.shape[1]) for p in prompts],
        reference_generations=[g.tolist() for g in ref_gen],
        reference_margin_median=[float(m.median()) for m in margins],
        seconds=seconds,
        reference_check={
            "tokens": check.tokens,
            "implementation": check.implementation,
            "max_abs_logit_diff": check.max_abs_diff,
            "tolerance": check.tolerance,
            "attention": check.describe(),
        },
    )
    for method in methods:
        bar.set_postfix_str(method.name)
        acc = ErrorCurve(len(ref.out), nb)
        logits = paged_logits(
            model,
            input_ids,
            method,
            sink_pages=settings.sink_pages,
            observer=lambda layer, q, k, v, out, *_, acc=acc: acc.add(
                layer, out, ref.out[layer], g
            ),
        )
        tm = token_metrics(ref_logp, logits, targets, scored_from)
        del logits
        static = _static_curve(method, ref, settings.sink_pages, g, nb)
        layout = method.layout
        divergence = _divergence(model, method, prompts, ref_gen, settings)
        result.rows.append(
            MethodResult(
                method=method.name,
                k_bits=method.k_bits,
                v_bits=method.v_bits,
                page_size=method.page_size,
                bits_per_element=round(layout.bits_per_element, 4),
                bytes_per_token_per_head=layout.bytes_per_token,
                compression=round(layout.compression, 3),
                ppl=tm.ppl,
                delta_ppl=tm.ppl - reference_ppl,
                kl=tm.kl,
                top1=tm.top1,
                divergence=divergence,
                divergence_margin=[
                    float(m[d]) if d < len(m) else None
                    for m, d in zip(margins, divergence, strict=True)
                ],
                accumulated=acc.curve(),
                static=static.curve(),
                accumulated_per_layer=acc.per_layer(),
                static_per_layer=static.per_layer(),
            )
        )
        lap(method.name)
        bar.update()
    bar.close()
    return result
