"""Hooks on ``sglang.srt.server_args.ServerArgs`` (sglang==0.5.23).

* ``ServerArgs.add_cli_args`` (AFTER): ``kvarn`` becomes a ``--kv-cache-dtype`` choice (so
  ``--kv-cache kvarn`` parses by abbreviation) and an ``--attention-backend`` choice; adds
  ``--kvarn-preset``, ``--kvarn-sink-pages``, ``--kvarn-slots``.
* ``ServerArgs.from_cli_args`` (AFTER): carries the flags as ``_kvarn_*`` attributes, selects
  the ``kvarn`` attention backend, turns prefill CUDA graphs and overlap scheduling off and
  decode CUDA graphs off unless ``--cuda-graph-backend-decode full`` asks for them, and
  refuses unsupported flags with one message each.
* ``ServerArgs.resolve_once`` (AFTER): refuses unsupported models (needs the model config).
"""

from __future__ import annotations

from kvarn_sglang.config import PRESETS, SUPPORTED_HEAD_DIMS
from kvarn_sglang.settings import DEFAULT_MAX_RUNNING_REQUESTS, KV_CACHE_CHOICE, settings_of

ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"
RESOLVE_ONCE = "sglang.srt.server_args.ServerArgs.resolve_once"

# (raw flag attribute, value that is fine, message)
_REFUSED_FLAGS = [
    ("speculative_algorithm", None, "speculative decoding: remove --speculative-algorithm"),
    ("enable_hierarchical_cache", False, "hierarchical cache: remove --enable-hierarchical-cache"),
    ("disaggregation_mode", "null", "PD disaggregation: remove --disaggregation-mode"),
    ("enable_lmcache", False, "LMCache: remove --enable-lmcache"),
    ("enable_flexkv", False, "FlexKV: remove --enable-flexkv"),
    ("enable_hisparse", False, "HiSparse: remove --enable-hisparse"),
    (
        "enable_page_major_kv_layout",
        False,
        "page-major layout: remove --enable-page-major-kv-layout",
    ),
    ("enable_kv_cache_sharding", False, "KV sharding: remove --enable-kv-cache-sharding"),
    ("enable_torch_compile", False, "torch.compile: remove --enable-torch-compile"),
    ("radix_cache_backend", None, "custom radix caches: remove --radix-cache-backend"),
]


def after_add_cli_args(result, parser):
    for action in parser._actions:
        choices = action.choices
        wanted = action.dest in ("kv_cache_dtype", "attention_backend")
        if wanted and choices is not None and KV_CACHE_CHOICE not in choices:
            action.choices = [*choices, KV_CACHE_CHOICE]
    parser.add_argument(
        "--kvarn-preset", default="k4v2_g128", choices=sorted(PRESETS),
        help="KVarN preset (with --kv-cache kvarn); --page-size must equal its tile size G",
    )  # fmt: skip
    parser.add_argument("--kvarn-sink-pages", type=int, default=1, help="fp16 sink pages")
    parser.add_argument(
        "--kvarn-slots", type=int, default=None,
        help="fp16 page slots (default: (sink pages + 1) per running request + headroom)",
    )  # fmt: skip
    return result


def refuse_flags(args) -> None:
    """Raise ``ValueError`` for a flag KVarN does not support yet (args: argparse namespace)."""
    preset = PRESETS[args.kvarn_preset]
    if args.page_size != preset.page_size:
        raise ValueError(
            f"--kv-cache kvarn with --kvarn-preset {preset.name} needs --page-size "
            f"{preset.page_size} (got {args.page_size})"
        )
    if args.kvarn_sink_pages < 0:
        raise ValueError(f"--kvarn-sink-pages must be >= 0 (got {args.kvarn_sink_pages})")
    for name, fine, message in _REFUSED_FLAGS:
        value = getattr(args, name, fine)
        if value is not None and value != fine:
            raise ValueError(f"--kv-cache kvarn does not support {message}")
    for name in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        if getattr(args, name, None) not in (None, KV_CACHE_CHOICE):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--kv-cache kvarn needs {flag} kvarn (or leave it unset)")
    if getattr(args, "cuda_graph_backend_decode", None) not in (None, "disabled", "full"):
        raise ValueError(
            "--kv-cache kvarn captures decode as a full CUDA graph only: use "
            "--cuda-graph-backend-decode full or disabled (the default with KVarN)"
        )
    if getattr(args, "cuda_graph_backend_prefill", None) not in (None, "disabled"):
        raise ValueError(
            "--kv-cache kvarn does not support prefill CUDA graphs: use "
            "--cuda-graph-backend-prefill disabled (the default with KVarN)"
        )


def after_from_cli_args(result, cls, args):
    if getattr(args, "kv_cache_dtype", None) != KV_CACHE_CHOICE:
        return result
    refuse_flags(args)
    result._kvarn_preset = args.kvarn_preset
    result._kvarn_sink_pages = args.kvarn_sink_pages
    result._kvarn_slots = args.kvarn_slots
    result.attention_backend = KV_CACHE_CHOICE
    # Decode CUDA graphs are opt-in (--cuda-graph-backend-decode full) until run on a GPU.
    if getattr(args, "cuda_graph_backend_decode", None) is None:
        result.cuda_graph_backend_decode = "disabled"
    result.cuda_graph_backend_prefill = "disabled"
    # Slot bookkeeping runs on the scheduler's stream between passes; overlap scheduling
    # would run it beside the previous pass on another stream.
    result.disable_overlap_schedule = True
    if result.max_running_requests is None:
        result.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
    return result


def refuse_model(model_config, tp_size: int) -> None:
    """Raise ``ValueError`` for a model KVarN does not support (SGLang's ``ModelConfig``)."""
    from sglang.srt.configs.hybrid_arch import mambaish_config
    from sglang.srt.configs.model_config import AttentionArch

    if model_config.attention_arch != AttentionArch.MHA:
        raise ValueError("--kv-cache kvarn supports MHA/GQA models only (this model uses MLA)")
    if model_config.is_hybrid_swa or model_config.sliding_window_size is not None:
        raise ValueError("--kv-cache kvarn does not support sliding-window or hybrid models")
    if mambaish_config(model_config) is not None or model_config.is_encoder_decoder:
        raise ValueError(
            "--kv-cache kvarn does not support hybrid linear or encoder-decoder models"
        )
    if (
        model_config.head_dim != model_config.v_head_dim
        or model_config.head_dim not in SUPPORTED_HEAD_DIMS
    ):
        raise ValueError(
            f"Unsupported head_dim {model_config.head_dim}: KVarN needs a power of two in "
            f"{{64, 128, 256}} for K and V"
        )
    kv_heads = model_config.num_key_value_heads
    if tp_size > kv_heads and tp_size % kv_heads == 0:
        return  # replicated KV heads: every rank holds whole heads
    if kv_heads % tp_size:
        raise ValueError(
            f"--tp-size {tp_size} splits {kv_heads} KV heads unevenly: use a --tp-size that "
            f"divides {kv_heads}"
        )


def after_resolve_once(result, self):
    if settings_of(self) is None or getattr(self, "_kvarn_checked", False):
        return result
    from sglang.srt.arg_groups.overrides import model_config_of, resolution_result

    refuse_model(model_config_of(self), int(resolution_result(self, "tp_size") or 1))
    self._kvarn_checked = True
    return result
