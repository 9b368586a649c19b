"""Registration in ``sglang.srt.layers.attention.attention_registry`` (sglang==0.5.23): the
``kvarn`` attention backend. ``ATTENTION_BACKENDS`` is a dict, so this is a direct
registration rather than a hook; the CLI choice is added with
``sglang.srt.arg_groups.choices.add_attention_backend_choices``."""

from __future__ import annotations

from kvarn_sglang.serving.settings import KV_CACHE_CHOICE


def register_backend() -> None:
    from sglang.srt.arg_groups.choices import (
        ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
    )
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )

    if KV_CACHE_CHOICE not in ATTENTION_BACKENDS:

        def create_kvarn_backend(model_runner):
            from kvarn_sglang.serving.backend import KVarNAttnBackend

            return KVarNAttnBackend(model_runner)

        register_attention_backend(KV_CACHE_CHOICE)(create_kvarn_backend)
    if KV_CACHE_CHOICE not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([KV_CACHE_CHOICE])
