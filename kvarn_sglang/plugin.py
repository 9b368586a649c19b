"""The SGLang plugin: ``register()`` is the ``sglang.srt.plugins`` entry point.

SGLang calls it in every process it starts (launcher, scheduler, detokenizer). It registers
the hooks of ``kvarn_sglang.patches`` (one module per SGLang component, each naming its
target) and the ``kvarn`` attention backend. Nothing changes unless the server is started
with ``--kv-cache kvarn``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from kvarn_sglang.patches import (
        attention_registry,
        kv_cache_dtype,
        models_utils,
        platform,
        pool_configurator,
        server_args,
    )

    after, around = HookType.AFTER, HookType.AROUND
    hooks = [
        (server_args.ADD_CLI_ARGS, server_args.after_add_cli_args, after),
        (server_args.FROM_CLI_ARGS, server_args.after_from_cli_args, after),
        (server_args.RESOLVE_ONCE, server_args.after_resolve_once, after),
        (
            kv_cache_dtype.CONFIGURE_KV_CACHE_DTYPE,
            kv_cache_dtype.around_configure_kv_cache_dtype,
            around,
        ),
        (pool_configurator.COMPUTE_CELL_SIZE, pool_configurator.after_compute_cell_size, after),
        (pool_configurator.CONFIGURATOR_INIT, pool_configurator.after_init, after),
        (
            pool_configurator.CALCULATE_POOL_SIZES,
            pool_configurator.around_calculate_pool_sizes,
            around,
        ),
        (platform.GET_KV_POOL_CLS, platform.after_get_kv_pool_cls, after),
        (platform.GET_PAGED_ALLOCATOR_CLS, platform.after_get_paged_allocator_cls, after),
        (
            models_utils.ENABLE_FUSED_SET_KV_BUFFER,
            models_utils.around_enable_fused_set_kv_buffer,
            around,
        ),
    ]
    for target, fn, kind in hooks:
        if not any(h is fn for _, h, _ in HookRegistry._hooks.get(target, [])):
            HookRegistry.register(target, fn, kind)
    attention_registry.register_backend()
    logger.info("kvarn-sglang: registered %d hooks and the kvarn attention backend", len(hooks))
