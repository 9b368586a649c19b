"""Reference Gated DeltaNet operators for the CPU test stand-in (``sgl_kernel.mamba`` and the
``torch.ops.sgl_kernel.*_cpu`` ops SGLang's GDN backend binds at import on a CPU).

Written for clarity from the semantics of SGLang's own Triton kernels (``causal_conv1d``,
``fla.fused_recurrent``, ``fused_gdn_gating``, ``fused_sigmoid_gating_recurrent``): one
sequence and one token at a time in fp32. State layouts follow SGLang's pools: a conv state
``[dim, width - 1]`` holds the last inputs (before the convolution), a recurrent state
``[HV, V, K]`` per sequence; both are updated in place at the sequence's cache index (a
negative index is a padding row: skipped). Queries/keys are L2-normalised inside (eps 1e-6
under the square root) and queries scaled by ``K ** -0.5``; value heads share a key head in
groups of ``HV // H``.

Test-only, as the rest of ``tests/cpu_engine``: never installed or shipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64  # tokens between the per-chunk states ``chunk_gated_delta_rule`` returns


def _conv(x: torch.Tensor, state: torch.Tensor, weight, bias, activation) -> torch.Tensor:
    """Causal depthwise conv of ``x [dim, L]`` after the ``state [dim, W-1]`` inputs."""
    full = torch.cat([state.float(), x.float()], 1)
    w = weight.float()
    width = w.shape[1]
    out = torch.stack([(full[:, t : t + width] * w).sum(1) for t in range(x.shape[1])], 1)
    if bias is not None:
        out = out + bias.float()[:, None]
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d_fn_cpu(
    x, weight, bias=None, query_start_loc=None, cache_indices=None, has_initial_state=None,
    conv_states=None, activation="silu", pad_slot_id=-1, **kwargs,
):  # fmt: skip
    """Prefill convolution: ``x [dim, T]`` (sequences concatenated, ``query_start_loc``)
    -> ``[dim, T]``; ``conv_states[cache_indices[i]]`` becomes sequence i's last inputs."""
    out = torch.zeros_like(x)
    starts = query_start_loc.tolist() if query_start_loc is not None else [0, x.shape[1]]
    width = weight.shape[1]
    for i in range(len(starts) - 1):
        lo, hi = starts[i], starts[i + 1]
        idx = int(cache_indices[i]) if cache_indices is not None else i
        if idx == pad_slot_id or hi == lo:
            continue
        initial = has_initial_state is not None and bool(has_initial_state[i])
        state = conv_states[idx] if initial else x.new_zeros(x.shape[0], width - 1)
        out[:, lo:hi] = _conv(x[:, lo:hi], state, weight, bias, activation).to(x.dtype)
        if conv_states is not None:
            full = torch.cat([state, x[:, lo:hi]], 1)
            conv_states[idx] = full[:, -(width - 1) :].to(conv_states.dtype)
    return out


def causal_conv1d_update_cpu(
    x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
    conv_state_indices=None, pad_slot_id=-1, **kwargs,
):  # fmt: skip
    """Decode convolution: ``x [B, dim]`` (or ``[B, dim, L]``) -> same shape, each row's
    conv state shifted by its new inputs."""
    if cache_seqlens is not None:
        raise NotImplementedError("circular conv states are not part of the stand-in")
    squeeze = x.dim() == 2
    xs = x.unsqueeze(-1) if squeeze else x
    out = torch.zeros_like(xs)
    width = weight.shape[1]
    for b in range(xs.shape[0]):
        idx = int(conv_state_indices[b]) if conv_state_indices is not None else b
        if idx == pad_slot_id:
            continue
        state = conv_state[idx, :, -(width - 1) :]
        out[b] = _conv(xs[b], state, weight, bias, activation).to(x.dtype)
        full = torch.cat([conv_state[idx], xs[b]], 1)
        conv_state[idx] = full[:, -conv_state.shape[2] :]
    return out.squeeze(-1) if squeeze else out


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _delta_rule(q, k, v, g, beta, state, scale, l2norm, chunk_states=None):
    """One sequence: ``q, k [T, H, K]``, ``v [T, HV, V]``, ``g, beta [T, HV]`` fp32,
    ``state [HV, V, K]`` fp32 (updated). Returns ``o [T, HV, V]``; appends the state at the
    start of every CHUNK tokens to ``chunk_states``."""
    hv, h = v.shape[1], q.shape[1]
    rep = hv // h
    if l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q, k = q.repeat_interleave(rep, 1) * scale, k.repeat_interleave(rep, 1)
    out = v.new_zeros(v.shape)
    for t in range(q.shape[0]):
        if chunk_states is not None and t % CHUNK == 0:
            chunk_states.append(state.clone())
        state = state * torch.exp(g[t])[:, None, None]
        delta = (v[t] - torch.einsum("hvk,hk->hv", state, k[t])) * beta[t][:, None]
        state = state + delta[:, :, None] * k[t][:, None, :]
        out[t] = torch.einsum("hvk,hk->hv", state, q[t])
    return out, state


def chunk_gated_delta_rule_cpu(
    q, k, v, g, beta, scale=None, initial_state=None, initial_state_indices=None,
    cu_seqlens=None, head_first=False, use_qk_l2norm_in_kernel=False, **kwargs,
):  # fmt: skip
    """Prefill Gated DeltaNet over ``q, k [1, T, H, K]``, ``v [1, T, HV, V]``, ``g, beta
    [1, T, HV]`` with per-sequence states ``initial_state[initial_state_indices[i]]``
    (updated in place). Returns ``(o [1, T, HV, V], final states [N, HV, V, K], per-chunk
    states [1, chunks, HV, V, K])``."""
    if head_first:
        raise NotImplementedError("head_first is not part of the stand-in")
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    starts = cu_seqlens.tolist() if cu_seqlens is not None else [0, q.shape[1]]
    out = torch.zeros(v.shape, dtype=v.dtype)
    finals, chunks = [], []
    for i in range(len(starts) - 1):
        lo, hi = starts[i], starts[i + 1]
        idx = int(initial_state_indices[i]) if initial_state_indices is not None else i
        state = (
            initial_state[idx].float()
            if idx >= 0
            else initial_state.new_zeros(initial_state.shape[1:], dtype=torch.float32)
        )
        o, state = _delta_rule(
            *(x[0, lo:hi].float() for x in (q, k, v, g, beta)), state, scale,
            use_qk_l2norm_in_kernel, chunks,
        )  # fmt: skip
        out[0, lo:hi] = o.to(v.dtype)
        if idx >= 0:
            initial_state[idx] = state.to(initial_state.dtype)
        finals.append(state)
    final = torch.stack(finals) if finals else None
    h = torch.stack(chunks)[None].to(v.dtype) if chunks else None
    return out, final, h


def fused_gdn_gating_cpu(A_log, a, b, dt_bias, beta=1.0, threshold=20.0):
    """``g = -exp(A_log) * softplus(a + dt_bias)``, ``beta = sigmoid(b)``, both
    ``fp32 [1, T, HV]``."""
    x = a.float() + dt_bias.float()
    soft = torch.where(beta * x <= threshold, torch.log1p(torch.exp(beta * x)) / beta, x)
    g = -torch.exp(A_log.float()) * soft
    return g[None], torch.sigmoid(b.float())[None]


def fused_sigmoid_gating_delta_rule_update_cpu(
    A_log, dt_bias, q, k, v, a, b, initial_state_source, initial_state_indices,
    cu_seqlens=None, use_qk_l2norm_in_kernel=False, softplus_beta=1.0,
    softplus_threshold=20.0,
):  # fmt: skip
    """Decode Gated DeltaNet: gates from ``a, b [T, HV]`` (``fused_gdn_gating_cpu``), then
    the recurrence over ``q, k [1, T, H, K]``, ``v [1, T, HV, V]`` per sequence of
    ``cu_seqlens``, states at ``initial_state_indices`` updated in place. Returns
    ``[1, T, HV, V]``."""
    g, beta = fused_gdn_gating_cpu(
        A_log, a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dt_bias,
        softplus_beta, softplus_threshold,
    )  # fmt: skip
    o, _, _ = chunk_gated_delta_rule_cpu(
        q, k, v, g, beta, initial_state=initial_state_source,
        initial_state_indices=initial_state_indices, cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )  # fmt: skip
    return o


def _register_ops() -> None:
    """``torch.ops.sgl_kernel.fused_gdn_gating_cpu`` and
    ``...fused_sigmoid_gating_delta_rule_update_cpu``, which SGLang binds at import."""
    lib = torch.library.Library("sgl_kernel", "FRAGMENT")
    lib.define(
        "fused_gdn_gating_cpu(Tensor A_log, Tensor a, Tensor b, Tensor dt_bias, "
        "float beta=1.0, float threshold=20.0) -> (Tensor, Tensor)"
    )
    lib.impl("fused_gdn_gating_cpu", fused_gdn_gating_cpu, "CompositeExplicitAutograd")
    lib.define(
        "fused_sigmoid_gating_delta_rule_update_cpu(Tensor A_log, Tensor dt_bias, Tensor q, "
        "Tensor k, Tensor v, Tensor a, Tensor b, Tensor(s!) initial_state_source, "
        "Tensor initial_state_indices, Tensor? cu_seqlens=None, "
        "bool use_qk_l2norm_in_kernel=False, float softplus_beta=1.0, "
        "float softplus_threshold=20.0) -> Tensor"
    )
    lib.impl(
        "fused_sigmoid_gating_delta_rule_update_cpu",
        fused_sigmoid_gating_delta_rule_update_cpu,
        "CompositeExplicitAutograd",
    )
    _LIBRARIES.append(lib)  # a Library deregisters its ops when collected


_LIBRARIES: list = []
_register_ops()
