"""Hooks on ``sglang.srt.server_args.ServerArgs`` (sglang==0.5.23).

* ``ServerArgs.add_cli_args`` (AFTER): ``kvarn`` becomes a ``--kv-cache-dtype`` choice (so
  ``--kv-cache kvarn`` parses by abbreviation) and an ``--attention-backend`` choice; adds
  ``--kvarn-preset``, ``--kvarn-sink-pages``, ``--kvarn-slots``.
* ``ServerArgs.from_cli_args`` (AFTER): carries the ``--kvarn-*`` flags as ``_kvarn_*``
  attributes; without ``--kv-cache kvarn`` it refuses them and ``--attention-backend kvarn``,
  which would otherwise be ignored or fail later.
* ``ServerArgs.resolve_once`` (BEFORE): with ``kv_cache_dtype == "kvarn"`` refuses
  unsupported flags and selects the KVarN configuration (the ``kvarn`` attention backend;
  prefill CUDA graphs and overlap scheduling off; decode CUDA graphs off unless
  ``--cuda-graph-backend-decode full`` asks for them). Every launcher resolves its
  ``ServerArgs`` once before it starts workers, so the CLI and the offline
  ``sglang.Engine(kv_cache_dtype="kvarn", ...)`` get the same settings and refusals (the
  Engine takes the default preset, or a ``ServerArgs`` from ``prepare_server_args``).
* ``ServerArgs.resolve_once`` (AFTER): refuses unsupported models (needs the model config):
  architectures, head dims, tensor-parallel splits of KV heads, SGLang's separate sliding-
  window pool and learned sinks, and attention variants the config declares (soft-capping,
  KV shared across layers, non-causal attention); and devices the kernels cannot run on
  (``kvarn_sglang.serving.device_check``: ROCm, GPUs older than the model's dtype needs,
  accelerators other than NVIDIA GPUs and the CPU reference). Sliding windows over the one
  pool are served (``KVarNAttnBackend`` honours each layer's window).

Every refusal is a ``ValueError`` whose message names the flag to change.
"""

from __future__ import annotations

from kvarn_sglang.format.config import DEFAULT_PRESET, PRESETS, SUPPORTED_HEAD_DIMS
from kvarn_sglang.serving.capacity import min_num_slots
from kvarn_sglang.serving.settings import (
    DEFAULT_MAX_RUNNING_REQUESTS,
    KV_CACHE_CHOICE,
    KVarNSettings,
    settings_of,
)

ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"
RESOLVE_ONCE = "sglang.srt.server_args.ServerArgs.resolve_once"
# The CLI flags and the ServerArgs attributes that carry them to every process.
KVARN_FLAGS = {"kvarn_preset": "_kvarn_preset", "kvarn_sink_pages": "_kvarn_sink_pages",
               "kvarn_slots": "_kvarn_slots"}  # fmt: skip

# (raw flag attribute, value that is fine, message)
_REFUSED_FLAGS = [
    ("speculative_algorithm", None, "speculative decoding: remove --speculative-algorithm"),
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
    # IDLE batches of DP attention reach the backend without extend lengths.
    ("enable_dp_attention", False, "DP attention: remove --enable-dp-attention"),
    # Micro-batches (two-batch overlap, PD multiplexing's split prefill) put several passes
    # in flight, while the KVarN backend plans, commits and releases slots one pass at a time.
    ("enable_two_batch_overlap", False, "two-batch overlap: remove --enable-two-batch-overlap"),
    ("enable_pdmux", False, "PD multiplexing: remove --enable-pdmux"),
    # A retried turn of a streaming session can resume inside a page already committed and
    # released from its slot: its writes would go to the scratch slot.
    ("enable_streaming_session", False, "streaming sessions: remove --enable-streaming-session"),
]
# (ServerArgs attribute, its flag, what it does) of sizes that must stay 1.
_REFUSED_SIZES = [
    # Several micro-batches in flight per stage (see above).
    ("pp_size", "--pp-size", "pipeline parallelism"),
    # These split one request's tokens or its attention across ranks; a KVarN page is one
    # request's G consecutive tokens on one rank.
    ("dcp_size", "--dcp-size", "decode context parallelism"),
    ("attn_cp_size", "--attn-cp-size", "attention context parallelism"),
    ("attn_dp_size", "--attn-dp-size", "DP attention"),
]
# Hybrid linear-attention architectures served with KVarN on their full-attention layers (the
# Gated DeltaNet layers keep SGLang's recurrent state pool), verified end to end on the CPU
# test bed (tests/test_server_models.py). Other hybrids (Mamba2: Nemotron-H, Falcon-H1; KDA:
# Kimi Linear; Lightning: MiniMax; Qwen3.5, whose CPU operators the stand-in lacks) are refused.
HYBRID_LINEAR_VERIFIED: frozenset[str] = frozenset({"Qwen3NextForCausalLM"})
# Model dtypes whose KV the fp16/bf16 slot pool would silently round.
_REFUSED_DTYPES = ("float", "float32")


def after_add_cli_args(result, parser):
    for action in parser._actions:
        choices = action.choices
        wanted = action.dest in ("kv_cache_dtype", "attention_backend")
        if wanted and choices is not None and KV_CACHE_CHOICE not in choices:
            action.choices = [*choices, KV_CACHE_CHOICE]
    parser.add_argument(
        "--kvarn-preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
        help="KVarN preset (with --kv-cache kvarn); --page-size must equal its tile size G",
    )  # fmt: skip
    parser.add_argument("--kvarn-sink-pages", type=int, default=1, help="fp16 sink pages")
    parser.add_argument(
        "--kvarn-slots", type=int, default=None,
        help="fp16 page slots (default: one per running request + the sink pages of "
        "max(16, running / 8) distinct prefixes; at least max(running, 2) + sink pages)",
    )  # fmt: skip
    return result


def refuse_flags(args, settings: KVarNSettings) -> None:
    """Raise ``ValueError`` for a flag KVarN does not support yet (``args``: a raw
    ``ServerArgs``; ``settings``: its ``--kvarn-*`` flags)."""
    preset = PRESETS[settings.preset]
    if args.page_size != preset.page_size:
        raise ValueError(
            f"--kv-cache kvarn with --kvarn-preset {preset.name} needs --page-size "
            f"{preset.page_size} (got {args.page_size})"
        )
    if settings.sink_pages < 0:
        raise ValueError(f"--kvarn-sink-pages must be >= 0 (got {settings.sink_pages})")
    running = settings.max_running_requests
    least = min_num_slots(running, settings.sink_pages)
    if settings.slots is not None and settings.slots < least:
        raise ValueError(
            f"--kvarn-slots {settings.slots} is too few fp16 page slots: {running} running "
            f"requests need a filling page each (a request prefilled in chunks two) plus one "
            f"shared sink prefix (max(--max-running-requests, 2) + --kvarn-sink-pages = "
            f"{least}); raise --kvarn-slots to at least {least} or lower --max-running-requests"
        )
    if getattr(args, "dtype", "auto") in _REFUSED_DTYPES:
        raise ValueError(
            f"--kv-cache kvarn stores K/V in fp16 or bf16, not {args.dtype}: use --dtype "
            f"float16, bfloat16 or auto"
        )
    refuse_pd_flags(args)
    for name, fine, message in _REFUSED_FLAGS:
        value = getattr(args, name, fine)
        if value is not None and value != fine:
            raise ValueError(f"--kv-cache kvarn does not support {message}")
    if getattr(args, "enable_hierarchical_cache", False):
        refuse_hicache_options(args)
    for name, flag, what in _REFUSED_SIZES:
        size = getattr(args, name, 1) or 1
        if size != 1:
            raise ValueError(f"--kv-cache kvarn does not support {what}: use {flag} 1 (got {size})")
    for name in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        if getattr(args, name, None) not in (None, KV_CACHE_CHOICE):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--kv-cache kvarn needs {flag} kvarn (or leave it unset)")
    if getattr(args, "cuda_graph_backend_decode", None) not in (None, "disabled", "full"):
        raise ValueError(
            "--kv-cache kvarn captures decode as a full CUDA graph only: use "
            "--cuda-graph-backend-decode full or disabled (the default with KVarN)"
        )
    if getattr(args, "cuda_graph_backend_decode", None) == "full":
        refuse_metadata_glue_graph()
    if getattr(args, "cuda_graph_backend_prefill", None) not in (None, "disabled"):
        raise ValueError(
            "--kv-cache kvarn does not support prefill CUDA graphs: use "
            "--cuda-graph-backend-prefill disabled (the default with KVarN)"
        )


def refuse_metadata_glue_graph() -> None:
    """Raise ``ValueError`` if SGLang would capture the decode graphs' metadata preparation
    (``SGLANG_ENABLE_METADATA_GLUE_GRAPH``): its replay runs only the recorded device work,
    while KVarN plans every decode step from host lengths (which pages complete, whose fp16
    slots to release; ``KVarNAttnBackend.init_forward_metadata_out_graph``), so pages would
    never be committed and slots never released."""
    from sglang.srt.environ import envs

    if envs.SGLANG_ENABLE_METADATA_GLUE_GRAPH.get():
        raise ValueError(
            "--kv-cache kvarn plans each captured decode step on the host, which SGLang's "
            "metadata glue graph skips: unset SGLANG_ENABLE_METADATA_GLUE_GRAPH, or use "
            "--cuda-graph-backend-decode disabled"
        )


def refuse_hicache_options(args) -> None:
    """Raise ``ValueError`` for HiCache options the KVarN host tier does not implement: L3
    backends other than ``file`` (the others read and write host pages zero-copy, in SGLang's
    dense layouts) and host memory as a transient buffer (``buffer_only``)."""
    backend = getattr(args, "hicache_storage_backend", None)
    if backend not in (None, "file"):
        raise ValueError(
            f"--kv-cache kvarn stores HiCache pages in L3 with --hicache-storage-backend file "
            f"only (got {backend}): use file, or leave --hicache-storage-backend unset"
        )
    if getattr(args, "hicache_host_memory_mode", "cache") != "cache":
        raise ValueError(
            "--kv-cache kvarn keeps HiCache pages in host memory as a cache: use "
            "--hicache-host-memory-mode cache"
        )


# PD disaggregation (``kvarn_sglang.patches.disaggregation``): (attribute, value that is fine,
# message) of the PD flags KVarN refuses.
_REFUSED_PD_FLAGS = [
    # The decode server's own host pool (HiCache) holds fp16 pages, not KVarN's.
    (
        "disaggregation_decode_host_receive_threshold",
        1.0,
        "receiving KV into the decode server's host pool: remove "
        "--disaggregation-decode-host-receive-threshold",
    ),
    (
        "disaggregation_decode_enable_offload_kvcache",
        False,
        "offloading the decode server's KV: remove --disaggregation-decode-enable-offload-kvcache",
    ),
    # The checksum digests the state component's indices as SGLang lays them out, not as
    # KVarN's slot lists.
    (
        "disaggregation_enable_kv_checksum",
        False,
        "PD KV checksums: remove --disaggregation-enable-kv-checksum",
    ),
    (
        "disaggregation_decode_enable_radix_cache",
        False,
        "a prefix cache on the PD decode server (untested with KVarN pages): remove "
        "--disaggregation-decode-enable-radix-cache",
    ),
    (
        "enable_pd_role_switch",
        False,
        "switching PD roles at runtime: remove --enable-pd-role-switch",
    ),
]
_PD_BACKENDS = ("mooncake", "mooncake_tcp", "nixl", "fake")


def refuse_pd_flags(args) -> None:
    """Raise ``ValueError`` for a PD disaggregation setting KVarN does not support."""
    if getattr(args, "disaggregation_mode", "null") in (None, "null"):
        return
    backend = getattr(args, "disaggregation_transfer_backend", "mooncake")
    if backend not in _PD_BACKENDS:
        raise ValueError(
            f"--kv-cache kvarn moves pages with --disaggregation-transfer-backend mooncake, "
            f"mooncake_tcp or nixl (got {backend}, untested with KVarN pages)"
        )
    if getattr(args, "enable_hierarchical_cache", False):
        raise ValueError(
            "--kv-cache kvarn does not support HiCache together with PD disaggregation "
            "(untested with KVarN pages): remove --enable-hierarchical-cache or "
            "--disaggregation-mode"
        )
    for name, fine, message in _REFUSED_PD_FLAGS:
        value = getattr(args, name, fine)
        if value is not None and value != fine:
            raise ValueError(f"--kv-cache kvarn does not support {message}")
    backup = getattr(args, "disaggregation_decode_retraction_backup", None)
    if args.disaggregation_mode == "decode" and backup not in (None, "cpu_tensor"):
        raise ValueError(
            f"--kv-cache kvarn backs up retracted requests on a decode server with "
            f"--disaggregation-decode-retraction-backup cpu_tensor (got {backup}: SGLang's "
            f"host pool holds fp16 pages)"
        )


def refuse_without_kvarn(args) -> None:
    """Raise ``ValueError`` for KVarN flags given without ``--kv-cache kvarn``."""
    defaults = (("kvarn_preset", DEFAULT_PRESET), ("kvarn_sink_pages", 1), ("kvarn_slots", None))
    for name, default in defaults:
        if getattr(args, name, default) != default:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} needs --kv-cache kvarn: add it, or remove {flag}")
    for name in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        if getattr(args, name, None) == KV_CACHE_CHOICE:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} kvarn reads KVarN pages only: add --kv-cache kvarn, or choose "
                f"another {flag}"
            )


def after_from_cli_args(result, cls, args):
    if getattr(args, "kv_cache_dtype", None) != KV_CACHE_CHOICE:
        refuse_without_kvarn(args)
        return result
    for flag, attribute in KVARN_FLAGS.items():
        setattr(result, attribute, getattr(args, flag))
    return result


def configure_kvarn(server_args) -> None:
    """Refuse what KVarN does not support and select its configuration on a raw
    ``ServerArgs`` whose ``kv_cache_dtype`` is ``kvarn`` (before resolution)."""
    from kvarn_sglang.patches.plugin import require_hooks

    require_hooks()
    if server_args.max_running_requests is None:
        server_args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
    refuse_flags(server_args, settings_of(server_args))
    server_args.attention_backend = KV_CACHE_CHOICE
    # Decode CUDA graphs are opt-in (--cuda-graph-backend-decode full) until run on a GPU.
    if server_args.cuda_graph_backend_decode is None:
        server_args.cuda_graph_backend_decode = "disabled"
    server_args.cuda_graph_backend_prefill = "disabled"
    # A PD decode server backs retracted requests up in host memory, the one backup that
    # holds KVarN pages (``kvarn_sglang.serving.retraction_backup``).
    if server_args.disaggregation_mode == "decode":
        server_args.disaggregation_decode_retraction_backup = "cpu_tensor"
    # Slot bookkeeping runs on the scheduler's stream between passes; overlap scheduling
    # would run it beside the previous pass on another stream.
    server_args.disable_overlap_schedule = True


def before_resolve_once(self):
    if settings_of(self) is not None and not getattr(self, "_resolution_finished", False):
        configure_kvarn(self)


def refuse_model(model_config, tp_size: int) -> None:
    """Raise ``ValueError`` for a model KVarN does not support (SGLang's ``ModelConfig``)."""
    from sglang.srt.configs.hybrid_arch import mambaish_config
    from sglang.srt.configs.model_config import AttentionArch

    serve = "serve this model without --kv-cache kvarn"
    if model_config.attention_arch != AttentionArch.MHA:
        raise ValueError(
            f"--kv-cache kvarn supports MHA/GQA models only (this one uses MLA): {serve}"
        )
    # Sliding windows over SGLang's one KV pool (Gemma 3; Mistral's window SGLang ignores) are
    # a mask KVarN attention honours per layer; SGLang's separate window pool is another pool.
    if model_config.is_hybrid_swa:
        raise ValueError(
            "--kv-cache kvarn does not support SGLang's separate sliding-window KV pool (hybrid "
            "SWA memory): add --disable-hybrid-swa-memory (windows then mask one pool, as for "
            f"Gemma 3) or {serve}"
        )
    if getattr(model_config, "has_attention_sinks", False):
        raise ValueError(
            f"--kv-cache kvarn does not support learned attention sinks (gpt-oss): {serve}"
        )
    arch = (getattr(model_config.hf_config, "architectures", None) or [None])[0]
    if mambaish_config(model_config) is not None and arch not in HYBRID_LINEAR_VERIFIED:
        raise ValueError(
            f"--kv-cache kvarn supports the hybrid linear-attention models it was verified "
            f"with ({', '.join(sorted(HYBRID_LINEAR_VERIFIED))}), not {arch}: {serve}"
        )
    if model_config.is_encoder_decoder:
        raise ValueError(f"--kv-cache kvarn does not support encoder-decoder models: {serve}")
    refuse_attention_variants(model_config.hf_config, model_config.hf_text_config, serve)
    if (
        model_config.head_dim != model_config.v_head_dim
        or model_config.head_dim not in SUPPORTED_HEAD_DIMS
    ):
        dims = {model_config.head_dim, model_config.v_head_dim}
        raise ValueError(
            f"Unsupported head_dim {'/'.join(map(str, sorted(dims)))}: KVarN needs one power of "
            f"two in {{64, 128, 256}} for K and V; {serve}"
        )
    kv_heads = model_config.num_key_value_heads
    if tp_size > kv_heads and tp_size % kv_heads == 0:
        return  # replicated KV heads: every rank holds whole heads
    if kv_heads % tp_size:
        raise ValueError(
            f"--tp-size {tp_size} splits {kv_heads} KV heads unevenly: use a --tp-size that "
            f"divides {kv_heads}"
        )


# Architectures whose attention soft-caps logits even when the config does not say so
# (``sglang.srt.models.grok``: ``attn_logit_softcapping`` defaults to 30).
_SOFTCAP_BY_DEFAULT = {"Grok1ForCausalLM": 30.0, "Grok1ModelForCausalLM": 30.0}


def refuse_attention_variants(hf_config, hf_text_config, serve: str) -> None:
    """Raise ``ValueError`` for attention that the config declares and KVarN does not
    implement: logit soft-capping, KV shared across layers, non-causal attention. The
    scheduler checks the layers it built as well (``kvarn_sglang.serving.model_check``)."""
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cap = getattr(hf_text_config, "attn_logit_softcapping", None)
    cap = _SOFTCAP_BY_DEFAULT.get(arch, 0.0) if cap is None else cap
    if cap and cap > 0:
        raise ValueError(
            f"--kv-cache kvarn does not support attention logit soft-capping ({arch}: "
            f"attn_logit_softcapping {cap}): {serve}"
        )
    if (getattr(hf_text_config, "num_kv_shared_layers", 0) or 0) > 0:
        raise ValueError(
            f"--kv-cache kvarn does not support KV shared across layers (num_kv_shared_layers "
            f"{hf_text_config.num_kv_shared_layers}): {serve}"
        )
    if getattr(hf_text_config, "is_causal", True) is False:
        raise ValueError(
            f"--kv-cache kvarn does not support non-causal (encoder-only) attention: {serve}"
        )


def after_resolve_once(result, self):
    if settings_of(self) is None or getattr(self, "_kvarn_checked", False):
        return result
    from sglang.srt.arg_groups.overrides import model_config_of, resolution_result

    model_config = model_config_of(self)
    refuse_model(model_config, int(resolution_result(self, "tp_size") or 1))
    refuse_device_of(self, model_config.dtype)
    self._kvarn_checked = True
    return result


def refuse_device_of(server_args, model_dtype) -> None:
    """Raise ``ValueError`` unless the GPUs the server will use run the KVarN kernels for
    this model (``kvarn_sglang.serving.device_check``)."""
    import torch
    from sglang.srt.arg_groups.overrides import resolution_result

    from kvarn_sglang.serving.device_check import device_facts, refuse_device

    ranks = int(resolution_result(server_args, "tp_size") or 1) * int(
        resolution_result(server_args, "dp_size") or 1
    )
    base, step = server_args.base_gpu_id or 0, server_args.gpu_id_step or 1
    device = resolution_result(server_args, "device") or server_args.device or "cuda"
    dtype = model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16
    refuse_device(device_facts(device, [base + i * step for i in range(ranks)]), dtype)
