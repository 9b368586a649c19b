"""A test-only SGLang plugin: stock PD disaggregation on the CPU test bed.

Found through ``pd_testbed-0.dist-info`` beside it when this directory is on ``PYTHONPATH``
(``benchmarks.harness.server_process.cpu_engine_env``); never installed or shipped.

Mooncake's sender hands the prefill's page indices to its transfer thread through pinned
host memory and a ``torch.cuda.Event`` (``MooncakeKVSender.supports_host_tensor_indices``,
sglang 0.5.23): both need CUDA. On the CPU test bed the sender takes the host path that the
other transfer backends take. Set when a prefill server builds its KV manager, so servers
that are not PD prefill servers import nothing of it.
"""

from __future__ import annotations

INIT_KV_MANAGER = "sglang.srt.disaggregation.prefill.PrefillBootstrapQueue._init_kv_manager"


def before_init_kv_manager(self, *args, **kwargs):
    from sglang.srt.disaggregation.mooncake.conn import MooncakeKVSender

    MooncakeKVSender.supports_host_tensor_indices = False


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(INIT_KV_MANAGER, before_init_kv_manager, HookType.BEFORE)
