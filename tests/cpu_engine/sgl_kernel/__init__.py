"""A test-only stand-in for ``sgl_kernel``, so stock SGLang 0.5.23 serves on a CPU.

SGLang's CPU engine (``--device cpu``, ``SGLANG_USE_CPU_ENGINE=1``) imports ``sgl_kernel``'s
``*_cpu`` operators at import time, but the only wheel on PyPI (``sglang-kernel`` 0.4.10) is
built for CUDA, has none of them and does not import without libcuda. The test suite and the
CPU main job put this directory on ``PYTHONPATH`` of the server process they start; it is
never installed or shipped with kvarn-sglang.

What it stands in for:

* ``assign_req_to_token_pool_cpu``: the one operator the non-speculative serving path calls
  (``sglang/srt/mem_cache/allocation.py``); implemented here in plain torch with the
  semantics of SGLang's Triton twin ``assign_req_to_token_pool``.
* ``mamba``: reference Gated DeltaNet operators (convolution, gating, the delta rule) that
  SGLang's GDN backend imports on a CPU, so hybrid linear-attention models (Qwen3-Next) run;
  ``triton_ops``: torch twins of the two Triton-only operators on Qwen3-Next's path (the gated
  RMSNorm, the shared expert's gate); ``device``: the test-only answer to
  ``torch.get_device_module()`` on a CPU.
* ``copy_all_layer_kv_cache_cpu`` (KV moves for speculative decoding) and seven
  speculative-decoding operators imported by ``sglang/kernels/ops/speculative/*``: imported,
  never called without ``--speculative-algorithm`` (which KVarN refuses); they raise.
"""

from __future__ import annotations

import torch

from sgl_kernel import device, mamba, triton_ops  # noqa: F401 (registers ops, device answer)


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    max_context_len: int,
) -> None:
    """Write each request's new token slots into its row of ``req_to_token``.

    Request i (row ``req_pool_indices[i]``) gets ``out_cache_loc`` entries for positions
    ``start_offset[i] .. end_offset[i] - 1``; the entries of all requests are concatenated
    in batch order.
    """
    pos = 0
    rows, starts, ends = (t.tolist() for t in (req_pool_indices, start_offset, end_offset))
    for row, start, end in zip(rows, starts, ends, strict=True):
        if not 0 <= start <= end <= max_context_len:
            raise ValueError(f"Invalid offsets {start}..{end} for a row of {max_context_len}")
        req_to_token[row, start:end] = out_cache_loc[pos : pos + end - start].to(req_to_token.dtype)
        pos += end - start


def _not_in_the_stand_in(name: str):
    def unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not part of the CPU test stand-in (speculative decoding)"
        )

    unavailable.__name__ = name
    return unavailable


copy_all_layer_kv_cache_cpu = _not_in_the_stand_in("copy_all_layer_kv_cache_cpu")
build_tree_kernel_efficient_cpu = _not_in_the_stand_in("build_tree_kernel_efficient_cpu")
verify_tree_greedy_cpu = _not_in_the_stand_in("verify_tree_greedy_cpu")
assign_draft_cache_locs_contiguous_cpu = _not_in_the_stand_in(
    "assign_draft_cache_locs_contiguous_cpu"
)
assign_extend_cache_locs_cpu = _not_in_the_stand_in("assign_extend_cache_locs_cpu")
fill_accept_out_cache_loc_cpu = _not_in_the_stand_in("fill_accept_out_cache_loc_cpu")
fill_bonus_tokens_cpu = _not_in_the_stand_in("fill_bonus_tokens_cpu")
rotate_input_ids_cpu = _not_in_the_stand_in("rotate_input_ids_cpu")
