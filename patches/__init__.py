"""Hooks that change SGLang's behaviour (installed as ``kvarn_sglang.patches``).

One module per SGLang component hooked, each naming its exact dotted target in the pinned
sglang==0.5.23: ``server_args``, ``kv_cache_dtype``, ``pool_configurator``, ``platform``,
``models_utils``, ``internal_state``, ``schedule_policy`` (slot-aware admission),
``hicache`` (the KVarN host tier of ``--enable-hierarchical-cache``) and
``attention_registry``. ``plugin.register`` (the ``sglang.srt.plugins`` entry point) installs
them. Every hook is inert unless the server runs with ``--kv-cache kvarn``.
"""
