"""The CPU test stand-in's Gated DeltaNet operators (``tests/cpu_engine/sgl_kernel/mamba.py``,
``triton_ops.py``) against transformers' own torch implementations of Qwen3-Next's layers (the
convolution, the recurrent gated delta rule, the gated RMSNorm): the stand-in must compute the
model the eval computes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.qwen3_next import modeling_qwen3_next as hf

_PATH = Path(__file__).parent / "cpu_engine" / "sgl_kernel" / "mamba.py"
_spec = importlib.util.spec_from_file_location("kvarn_test_gdn_ops", _PATH)
ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ops)
_OPS2 = importlib.util.spec_from_file_location("kvarn_test_ops2", _PATH.with_name("triton_ops.py"))
_OPS2.loader.exec_module(importlib.util.module_from_spec(_OPS2))  # registers its operators

H, HV, K, V, DIM, WIDTH = 2, 4, 32, 16, 24, 4
LENS = [5, 70]  # the second crosses a 64-token chunk


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hf_recurrent(q, k, v, g, beta, state):
    """transformers' recurrence for one sequence; ``state [HV, V, K]`` (SGLang's layout)."""
    rep = HV // H
    o, final = hf.torch_recurrent_gated_delta_rule(
        q.repeat_interleave(rep, 1)[None], k.repeat_interleave(rep, 1)[None], v[None],
        g[None], beta[None], initial_state=state.transpose(1, 2)[None],
        output_final_state=True, use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    return o[0], final[0].transpose(1, 2)


def test_chunk_gated_delta_rule_is_transformers_recurrence_per_sequence():
    gen = _gen(0)
    t = sum(LENS)
    q, k = (torch.randn(1, t, H, K, generator=gen) for _ in range(2))
    v = torch.randn(1, t, HV, V, generator=gen)
    g = -torch.rand(1, t, HV, generator=gen)
    beta = torch.rand(1, t, HV, generator=gen)
    states = torch.randn(3, HV, V, K, generator=gen) * 0.1
    before = states.clone()
    cu = torch.tensor([0, LENS[0], t])
    o, final, chunks = ops.chunk_gated_delta_rule_cpu(
        q, k, v, g, beta, initial_state=states, initial_state_indices=torch.tensor([2, 0]),
        cu_seqlens=cu, use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    for i, slot in enumerate([2, 0]):
        lo, hi = int(cu[i]), int(cu[i + 1])
        ref_o, ref_state = _hf_recurrent(*(x[0, lo:hi] for x in (q, k, v, g, beta)), before[slot])
        torch.testing.assert_close(o[0, lo:hi], ref_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(states[slot], ref_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[i], ref_state, atol=1e-5, rtol=1e-5)
    assert torch.equal(states[1], before[1])  # untouched slot
    assert chunks.shape == (1, 1 + 2, HV, V, K)  # one chunk start, then two (70 tokens)


def test_decode_update_continues_the_prefill_state():
    """Prefill of n tokens then one decode step equals a prefill of n + 1 (gates from a, b)."""
    gen = _gen(1)
    n = 9
    q, k = (torch.randn(1, n + 1, H, K, generator=gen) for _ in range(2))
    v = torch.randn(1, n + 1, HV, V, generator=gen)
    a, b = (torch.randn(n + 1, HV, generator=gen) for _ in range(2))
    a_log, dt_bias = torch.randn(HV, generator=gen), torch.randn(HV, generator=gen)
    g, beta = torch.ops.sgl_kernel.fused_gdn_gating_cpu(a_log, a, b, dt_bias)
    torch.testing.assert_close(g[0], -a_log.exp() * F.softplus(a + dt_bias))
    torch.testing.assert_close(beta[0], torch.sigmoid(b))
    one, two = torch.zeros(1, HV, V, K), torch.zeros(1, HV, V, K)
    full, _, _ = ops.chunk_gated_delta_rule_cpu(
        q, k, v, g, beta, initial_state=one, initial_state_indices=torch.tensor([0]),
        cu_seqlens=torch.tensor([0, n + 1]), use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    ops.chunk_gated_delta_rule_cpu(
        q[:, :n], k[:, :n], v[:, :n], g[:, :n], beta[:, :n], initial_state=two,
        initial_state_indices=torch.tensor([0]), cu_seqlens=torch.tensor([0, n]),
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    last = torch.ops.sgl_kernel.fused_sigmoid_gating_delta_rule_update_cpu(
        A_log=a_log, dt_bias=dt_bias, q=q[:, n:], k=k[:, n:], v=v[:, n:], a=a[n:], b=b[n:],
        initial_state_source=two, initial_state_indices=torch.tensor([0]),
        cu_seqlens=torch.tensor([0, 1]), use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    torch.testing.assert_close(last[0, 0], full[0, n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)


def test_convolutions_are_transformers_and_hand_over_their_state():
    gen = _gen(2)
    weight, bias = torch.randn(DIM, WIDTH, generator=gen), torch.randn(DIM, generator=gen)
    x = torch.randn(DIM, sum(LENS) + 1, generator=gen)
    states = torch.zeros(2, DIM, WIDTH - 1)
    cu = torch.tensor([0, LENS[0], sum(LENS)])
    out = ops.causal_conv1d_fn_cpu(
        x[:, : sum(LENS)], weight, bias, query_start_loc=cu, cache_indices=torch.tensor([1, 0]),
        has_initial_state=torch.tensor([False, False]), conv_states=states, activation="silu",
    )  # fmt: skip
    for i in range(2):
        lo, hi = int(cu[i]), int(cu[i + 1])
        ref = hf.causal_conv1d_fn(x[None, :, lo:hi], weight, bias, activation="silu")[0]
        torch.testing.assert_close(out[:, lo:hi], ref, atol=1e-5, rtol=1e-5)
    # decode: the next token of sequence 1 (state slot 0) from the handed-over state
    step = ops.causal_conv1d_update_cpu(
        x[None, :, -1], states, weight, bias, "silu", conv_state_indices=torch.tensor([0])
    )
    whole = torch.cat([x[:, LENS[0] : sum(LENS)], x[:, -1:]], 1)
    ref = hf.causal_conv1d_fn(whole[None], weight, bias, activation="silu")[0, :, -1]
    torch.testing.assert_close(step[0], ref, atol=1e-5, rtol=1e-5)


def test_gated_rmsnorm_is_transformers():
    gen = _gen(3)
    norm = hf.Qwen3NextRMSNormGated(V, eps=1e-6)
    torch.nn.init.normal_(norm.weight, generator=gen)
    x, g = torch.randn(7, HV, V, generator=gen), torch.randn(7, HV, V, generator=gen)
    ref = norm(x.reshape(-1, V), g.reshape(-1, V))
    out = torch.ops.sgl_kernel.fused_rmsnorm_gated_cpu(x.reshape(-1, V), norm.weight, g, 1e-6)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


if __name__ == "__main__":
    test_chunk_gated_delta_rule_is_transformers_recurrence_per_sequence()
