"""Torch twins of the Triton-only operators on Qwen3-Next's path, for the CPU test stand-in.

On a CPU without AMX SGLang still launches two Triton kernels for Qwen3-Next, and Triton has
no CPU driver in a server process:

* the gated RMSNorm after the delta rule (``FusedRMSNormGated``,
  ``sglang/kernels/ops/attention/fla/fused_norm_gate.py``), whose CPU route
  ``sgl_kernel.fused_rmsnorm_gated_cpu`` SGLang takes only with AMX: the stand-in registers
  that operator (``rmsnorm(x) * weight * silu(g)`` in fp32, the Triton kernel's arithmetic)
  and routes the module to it;
* the shared expert's gate (``fused_gate_sigmoid_mul_add``,
  ``sglang/kernels/ops/elementwise/elementwise.py``, called from ``Qwen2MoeSparseMoeBlock``
  unless the gate runs on AMX): ``out (+)= sigmoid(h . w) * shared`` per token, in fp32.
"""

from __future__ import annotations

import torch


def fused_rmsnorm_gated_cpu(
    x: torch.Tensor, weight: torch.Tensor, g: torch.Tensor, eps: float
) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight * silu(g)`` over the last dimension, in fp32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    gf = g.float().reshape(y.shape)
    return (y * gf * torch.sigmoid(gf)).to(x.dtype)


def fused_gate_sigmoid_mul(hidden_states, gate_weight, shared_output, output, *, do_add):
    """``output = sigmoid(hidden_states @ gate_weight) * shared_output (+ output)``, per token
    in fp32 (``_launch_fused_gate_sigmoid_mul``'s contract)."""
    gate = torch.sigmoid(hidden_states.float() @ gate_weight.float())[:, None]
    result = gate * shared_output.float()
    if do_add:
        result += output.float()
    output.copy_(result)


def _register() -> None:
    lib = torch.library.Library("sgl_kernel", "FRAGMENT")
    lib.define("fused_rmsnorm_gated_cpu(Tensor x, Tensor weight, Tensor g, float eps) -> Tensor")
    lib.impl("fused_rmsnorm_gated_cpu", fused_rmsnorm_gated_cpu, "CompositeExplicitAutograd")
    _LIBRARIES.append(lib)  # a Library deregisters its ops when collected
    from sglang.kernels.ops.attention.fla import fused_norm_gate
    from sglang.kernels.ops.elementwise import elementwise

    fused_norm_gate._use_cpu = True  # its CPU route (otherwise taken only with AMX)
    elementwise._launch_fused_gate_sigmoid_mul = fused_gate_sigmoid_mul


_LIBRARIES: list = []
_register()
