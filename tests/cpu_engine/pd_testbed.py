"""A test-only SGLang plugin: stock PD disaggregation on the CPU test bed.

Found through ``pd_testbed-0.dist-info`` beside it when this directory is on ``PYTHONPATH``
(``benchmarks.harness.server_process.cpu_engine_env``); never installed or shipped.

* Mooncake's sender hands the prefill's page indices to its transfer thread through pinned
  host memory and a ``torch.cuda.Event`` (``MooncakeKVSender.supports_host_tensor_indices``,
  sglang 0.5.23): both need CUDA. On the CPU test bed the sender takes the host path that the
  other transfer backends take. Set when a prefill server builds its KV manager, so servers
  that are not PD prefill servers import nothing of it.
* SGLang's NIXL manager describes the KV pool's memory to NIXL as GPU memory (``"VRAM"``);
  on the CPU test bed it is host memory (``"DRAM"``), which NIXL's UCX backend moves over TCP.
  Only when NIXL is installed (``nixl``, ``nixl-cu13``).
"""

from __future__ import annotations

INIT_KV_MANAGER = "sglang.srt.disaggregation.prefill.PrefillBootstrapQueue._init_kv_manager"


def before_init_kv_manager(self, *args, **kwargs):
    from sglang.srt.disaggregation.mooncake.conn import MooncakeKVSender

    MooncakeKVSender.supports_host_tensor_indices = False


def before_nixl_descs(self, descs, mem_type=None, *args, **kwargs):
    """NIXL descriptors of host memory, whatever SGLang calls it."""
    return (self, descs, "DRAM" if mem_type == "VRAM" else mem_type, *args), kwargs


def register() -> None:
    from importlib.util import find_spec

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(INIT_KV_MANAGER, before_init_kv_manager, HookType.BEFORE)
    if find_spec("nixl") is not None:
        for method in ("get_reg_descs", "get_xfer_descs"):
            HookRegistry.register(
                f"nixl._api.nixl_agent.{method}", before_nixl_descs, HookType.BEFORE
            )
