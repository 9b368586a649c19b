"""The SGLang plugin: ``register()`` is the ``sglang.srt.plugins`` entry point.

SGLang calls it in every process it starts (launcher, scheduler, detokenizer). It registers
the hooks of ``kvarn_sglang.patches`` (one module per SGLang component, each naming its
target) and the ``kvarn`` attention backend. Nothing changes unless the server is started
with ``--kv-cache kvarn``.

SGLang applies hooks after every plugin registered its own, and only logs "Failed to apply
hooks" when one cannot be applied (a moved target, an import that fails). A KVarN server
missing a hook would run without part of KVarN, so ``require_hooks()`` refuses to start it:
the launcher checks while it configures KVarN, every scheduler process when it resolves the
``kvarn`` KV cache dtype.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _hooks() -> list[tuple[str, object, str]]:
    """``(dotted target, hook, kind)`` of every KVarN hook."""
    from kvarn_sglang.patches import (
        disaggregation,
        hicache,
        internal_state,
        kv_cache_dtype,
        models_utils,
        platform,
        pool_configurator,
        schedule_policy,
        scheduler,
        server_args,
        tokenizer_manager,
    )

    return [
        (server_args.ADD_CLI_ARGS, server_args.after_add_cli_args, "AFTER"),
        (server_args.FROM_CLI_ARGS, server_args.after_from_cli_args, "AFTER"),
        (server_args.RESOLVE_ONCE, server_args.before_resolve_once, "BEFORE"),
        (server_args.RESOLVE_ONCE, server_args.after_resolve_once, "AFTER"),
        (
            kv_cache_dtype.CONFIGURE_KV_CACHE_DTYPE,
            kv_cache_dtype.around_configure_kv_cache_dtype,
            "AROUND",
        ),
        (pool_configurator.COMPUTE_CELL_SIZE, pool_configurator.after_compute_cell_size, "AFTER"),
        (pool_configurator.CONFIGURATOR_INIT, pool_configurator.after_init, "AFTER"),
        (
            pool_configurator.CALCULATE_POOL_SIZES,
            pool_configurator.around_calculate_pool_sizes,
            "AROUND",
        ),
        (platform.GET_KV_POOL_CLS, platform.after_get_kv_pool_cls, "AFTER"),
        (platform.GET_PAGED_ALLOCATOR_CLS, platform.after_get_paged_allocator_cls, "AFTER"),
        (
            models_utils.ENABLE_FUSED_SET_KV_BUFFER,
            models_utils.around_enable_fused_set_kv_buffer,
            "AROUND",
        ),
        (internal_state.ADD_MEMORY_USAGE, internal_state.after_add_memory_usage, "AFTER"),
        (scheduler.RUN_BATCH, scheduler.after_run_batch, "AFTER"),
        (
            tokenizer_manager.VALIDATE_ONE_REQUEST,
            tokenizer_manager.before_validate_one_request,
            "BEFORE",
        ),
        (schedule_policy.ADD_ONE_REQ, schedule_policy.around_add_one_req, "AROUND"),
        (schedule_policy.ADD_CHUNKED_REQ, schedule_policy.around_add_chunked_req, "AROUND"),
        (hicache.INIT_HICACHE, hicache.before_init_hicache, "BEFORE"),
        *disaggregation.hooks(),
    ]


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from kvarn_sglang.patches import attention_registry

    hooks = _hooks()
    for target, fn, kind in hooks:
        if not any(h is fn for _, h, _ in HookRegistry._hooks.get(target, [])):
            HookRegistry.register(target, fn, HookType[kind])
    attention_registry.register_backend()
    logger.info("kvarn-sglang: registered %d hooks and the kvarn attention backend", len(hooks))


def missing_hooks() -> list[str]:
    """Targets of KVarN hooks that SGLang has not applied in this process."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    return sorted({target for target, _, _ in _hooks()} - HookRegistry._patched)


def require_hooks() -> None:
    """Raise ``RuntimeError`` unless every KVarN hook is applied in this process."""
    missing = missing_hooks()
    if missing:
        raise RuntimeError(
            f"--kv-cache kvarn: SGLang did not apply the KVarN hooks on {', '.join(missing)} "
            f"(see 'Failed to apply hooks' or 'Failed to execute general plugin' in the log); "
            f"refusing to start without them: install kvarn-sglang beside sglang==0.5.23"
        )
