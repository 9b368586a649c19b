"""The SGLang plugin: entry point, flags, startup refusals and the hooks' effects (CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvarn_sglang.format.config import get_preset
from kvarn_sglang.patches import kv_cache_dtype, models_utils, platform, pool_configurator
from kvarn_sglang.patches.server_args import refuse_model
from kvarn_sglang.serving import device_check
from kvarn_sglang.serving.allocator import KVarNPagedAllocator
from kvarn_sglang.serving.capacity import default_num_slots, slot_pool_bytes
from kvarn_sglang.serving.device_check import DeviceFacts
from kvarn_sglang.serving.pool import KVarNTokenToKVPool
from kvarn_sglang.serving.settings import KVarNSettings


@pytest.fixture(scope="module")
def prepare(tmp_path_factory):
    """``prepare_server_args`` with the plugin loaded through SGLang's own entry points."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig

    load_plugins()
    models = {}
    LLAMA = dict(architectures=["LlamaForCausalLM"])
    for name, cfg in {
        "llama": LlamaConfig(head_dim=128, architectures=["LlamaForCausalLM"]),
        "llama_hd80": LlamaConfig(head_dim=80, architectures=["LlamaForCausalLM"]),
        "mistral_swa": MistralConfig(sliding_window=4096, architectures=["MistralForCausalLM"]),
        "gemma3": Gemma3TextConfig(
            head_dim=128,
            sliding_window=512,
            architectures=["Gemma3ForCausalLM"],
            num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"],
        ),
        # Attention variants a config declares (Gemma 2, Grok; Gemma 3n/4; bidirectional).
        "llama_softcap": LlamaConfig(head_dim=128, attn_logit_softcapping=30.0, **LLAMA),
        "llama_kv_shared": LlamaConfig(head_dim=128, num_kv_shared_layers=1, **LLAMA),
        "llama_bidirectional": LlamaConfig(head_dim=128, is_causal=False, **LLAMA),
    }.items():
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2)
        shape |= dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
        for key, value in shape.items():
            setattr(cfg, key, value)
        path = tmp_path_factory.mktemp(name)
        cfg.save_pretrained(path)
        models[name] = str(path)

    def run(*flags: str, model: str = "llama"):
        return prepare_server_args(["--model-path", models[model], "--device", "cpu", *flags])

    return run


def test_entry_point_is_declared():
    import importlib.metadata

    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    assert any(ep.value == "kvarn_sglang.patches.plugin:register" for ep in eps)


def test_kv_cache_kvarn_selects_the_kvarn_configuration(prepare):
    sa = prepare("--kv-cache", "kvarn", "--page-size", "128")
    assert sa.kv_cache_dtype == "kvarn"
    assert sa._kvarn_preset == "k4v2_g128" and sa._kvarn_sink_pages == 1
    sa.resolve_once()
    assert sa.attention_backend == "kvarn" and sa.cuda_graph_backend_decode == "disabled"
    assert sa.max_running_requests == 128
    from sglang.srt.arg_groups.overrides import resolution_result

    assert resolution_result(sa, "attention_backend") == "kvarn"


def test_decode_cuda_graphs_are_opt_in_and_overlap_scheduling_is_off(prepare):
    sa = prepare("--kv-cache", "kvarn", "--page-size", "128")
    sa.resolve_once()
    assert sa.cuda_graph_backend_decode == "disabled" and sa.disable_overlap_schedule
    assert sa.cuda_graph_backend_prefill == "disabled"
    sa = prepare("--kv-cache", "kvarn", "--page-size", "128", "--cuda-graph-backend-decode", "full")
    sa.resolve_once()
    assert sa.cuda_graph_backend_decode == "full"


def test_engine_keyword_arguments_get_the_cli_settings_and_refusals(prepare, tmp_path):
    """``sglang.Engine(**kwargs)`` builds ``ServerArgs(**kwargs)`` without the CLI parser:
    resolving it applies the same KVarN settings and refusals as ``--kv-cache kvarn``."""
    from sglang.srt.server_args import ServerArgs

    model = prepare("--page-size", "128").model_path
    sa = ServerArgs(model_path=model, device="cpu", kv_cache_dtype="kvarn", page_size=128)
    sa.resolve_once()
    assert sa.attention_backend == "kvarn" and sa.disable_overlap_schedule
    assert sa.max_running_requests == 128 and sa.cuda_graph_backend_decode == "disabled"
    from kvarn_sglang.serving.settings import settings_of

    assert settings_of(sa).preset == "k4v2_g128"
    refused = ServerArgs(model_path=model, device="cpu", kv_cache_dtype="kvarn", page_size=16)
    with pytest.raises(ValueError, match="needs --page-size 128"):
        refused.resolve_once()
    refused = ServerArgs(model_path=model, device="cpu", kv_cache_dtype="kvarn",
                         page_size=128, attention_backend="triton")  # fmt: skip
    with pytest.raises(ValueError, match="--attention-backend kvarn"):
        refused.resolve_once()


def test_a_hook_sglang_did_not_apply_refuses_the_start(prepare, monkeypatch):
    """SGLang only logs "Failed to apply hooks"; a KVarN server refuses to start instead."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvarn_sglang.patches.platform import GET_KV_POOL_CLS
    from kvarn_sglang.patches.plugin import missing_hooks

    assert missing_hooks() == []
    monkeypatch.setattr(HookRegistry, "_patched", HookRegistry._patched - {GET_KV_POOL_CLS})
    assert missing_hooks() == [GET_KV_POOL_CLS]
    sa = prepare("--kv-cache", "kvarn", "--page-size", "128")
    with pytest.raises(RuntimeError, match=r"did not apply the KVarN hooks on .*get_kv_pool_cls"):
        sa.resolve_once()
    with pytest.raises(RuntimeError, match="refusing to start"):
        kv_cache_dtype.around_configure_kv_cache_dtype(
            None, server_args_kv_cache_dtype="kvarn", model_dtype=torch.bfloat16
        )


def test_a_hook_failing_in_sglang_is_detected():
    """A target SGLang cannot patch stays out of ``HookRegistry._patched``, which is what
    ``require_hooks`` reads."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    target = "sglang.srt.server_args.ServerArgs.no_such_method_kvarn_test"
    HookRegistry.register(target, lambda result, *a, **k: result, HookType.AFTER)
    try:
        HookRegistry.apply_hooks()  # logs "Failed to apply hooks", raises nothing
        assert target not in HookRegistry._patched
    finally:
        HookRegistry._hooks.pop(target, None)


def test_kvarn_flags_are_real(prepare):
    sa = prepare("--kv-cache", "kvarn", "--page-size", "64", "--kvarn-preset", "k4v4_g64",
                 "--kvarn-sink-pages", "2", "--kvarn-slots", "300",
                 "--max-running-requests", "100")  # fmt: skip
    assert (sa._kvarn_preset, sa._kvarn_sink_pages, sa._kvarn_slots) == ("k4v4_g64", 2, 300)


def test_plus_presets_are_kvarn_preset_choices(prepare):
    sa = prepare("--kv-cache", "kvarn", "--page-size", "128", "--kvarn-preset", "k2v2_g128_plus")
    assert sa._kvarn_preset == "k2v2_g128_plus"
    from kvarn_sglang.serving.settings import settings_of

    assert settings_of(sa).config(128).refit_iters == 4


def test_without_kvarn_nothing_changes(prepare):
    sa = prepare("--page-size", "128")
    assert sa.kv_cache_dtype == "auto" and not hasattr(sa, "_kvarn_preset")


def _model_config(**overrides):
    from sglang.srt.configs.model_config import AttentionArch

    base = dict(attention_arch=AttentionArch.MHA, is_hybrid_swa=False, sliding_window_size=None,
                is_encoder_decoder=False, head_dim=128, v_head_dim=128, num_key_value_heads=8,
                hf_config=SimpleNamespace(), hf_text_config=SimpleNamespace())  # fmt: skip
    return SimpleNamespace(**{**base, **overrides})


def _budget_configurator(monkeypatch, max_running_requests: int):
    """SGLang's ``DefaultPoolConfigurator`` state after the KVarN hooks, Llama-3-8B shape."""
    settings = KVarNSettings(max_running_requests=max_running_requests)
    monkeypatch.setattr(pool_configurator, "active_settings", lambda: settings)
    kvc = SimpleNamespace(kv_cache_dtype_str="kvarn", kv_cache_dtype=torch.float16,
                          model_config=SimpleNamespace(head_dim=128))  # fmt: skip
    conf = SimpleNamespace(_fixed_overhead_bytes=0, _zero_kv_max_tokens=0)
    conf._cell_size = pool_configurator.after_compute_cell_size(LLAMA3_8B_CELL, conf, kvc, 32)
    pool_configurator.after_init(None, conf, kvc)
    return conf


def _calculate_pool_sizes(conf, available_bytes: int):
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

    original = DefaultPoolConfigurator.calculate_pool_sizes
    original = getattr(original, "__wrapped__", original)  # the hook may already wrap it
    return pool_configurator.around_calculate_pool_sizes(original, conf, available_bytes, 128)


LLAMA3_8B_CELL = 32 * 8 * 256 * 2  # fp16 bytes per token: layers x KV heads x (K+V) x D x 2
SLOT_POOL_64 = slot_pool_bytes(LLAMA3_8B_CELL, get_preset(), default_num_slots(64, 1))
PACKED_PAGE = 32 * 8 * 13824  # one k4v2_g128 page over all layers and KV heads


def _refusal(kind: str, arg, prepare, monkeypatch) -> None:
    """Run one row of the refusal matrix; it must raise ``ValueError``."""
    if kind == "flags":
        prepare("--kv-cache", "kvarn", *arg).resolve_once()
    elif kind == "without_kvarn":
        prepare("--page-size", "128", *arg)
    elif kind == "model":
        prepare("--kv-cache", "kvarn", "--page-size", "128", model=arg).resolve_once()
    elif kind == "model_config":
        from sglang.srt.configs import hybrid_arch
        from sglang.srt.configs.model_config import AttentionArch

        overrides = dict(arg)
        mamba = overrides.pop("mamba", False)
        monkeypatch.setattr(hybrid_arch, "mambaish_config", lambda mc: object() if mamba else None)
        if overrides.get("attention_arch") == "MLA":
            overrides["attention_arch"] = AttentionArch.MLA
        tp = overrides.pop("tp", 1)
        refuse_model(_model_config(**overrides), tp_size=tp)
    elif kind == "budget":
        _calculate_pool_sizes(_budget_configurator(monkeypatch, 64), arg)
    elif kind == "device":  # what torch would say about the server's GPUs, faked
        facts, dtype = arg
        monkeypatch.setattr(device_check, "device_facts", lambda device, gpu_ids: facts)
        prepare("--kv-cache", "kvarn", *P128, "--dtype", dtype).resolve_once()
    elif kind == "env":
        for name, value in arg[0].items():
            monkeypatch.setenv(name, value)
        prepare("--kv-cache", "kvarn", *P128, *arg[1]).resolve_once()


P128 = ["--page-size", "128"]


def _gpu(capability: tuple[int, int], name: str, hip: str | None = None) -> DeviceFacts:
    return DeviceFacts("cuda", hip, ((0, name, capability),))


ROCM = _gpu((9, 4), "AMD Instinct MI300X", hip="6.4")
PD_DECODE = [*P128, "--disaggregation-mode", "decode"]
# id: (how the refusal is reached, its input, the flag its message must name)
REFUSAL_MATRIX = {
    "page_size": ("flags", ["--page-size", "64"], "--page-size"),
    "page_size_vs_preset": ("flags", [*P128, "--kvarn-preset", "k4v2_g64"], "--page-size"),
    "speculative": ("flags", [*P128, "--speculative-algorithm", "EAGLE"], "--speculative-"),
    "hicache_storage_mooncake": (
        "flags",
        [*P128, "--enable-hierarchical-cache", "--hicache-storage-backend", "mooncake"],
        "--hicache-storage-backend",
    ),
    "hicache_buffer_only": (
        "flags",
        [*P128, "--enable-hierarchical-cache", "--hicache-host-memory-mode", "buffer_only"],
        "--hicache-host-memory-mode",
    ),
    "pd_backend_mori": (
        "flags",
        [*P128, "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "mori"],
        "--disaggregation-transfer-backend",
    ),
    "pd_host_receive": (
        "flags",
        [*PD_DECODE, "--disaggregation-decode-host-receive-threshold", "0.5"],
        "--disaggregation-decode-host-receive-threshold",
    ),
    "pd_retraction_host_pool": (
        "flags",
        [*PD_DECODE, "--disaggregation-decode-retraction-backup", "host_pool"],
        "--disaggregation-decode-retraction-backup",
    ),
    "pd_kv_checksum": (
        "flags",
        [*PD_DECODE, "--disaggregation-enable-kv-checksum"],
        "--disaggregation-enable-kv-checksum",
    ),
    "pd_decode_radix_cache": (
        "flags",
        [*PD_DECODE, "--disaggregation-decode-enable-radix-cache"],
        "--disaggregation-decode-enable-radix-cache",
    ),
    "pd_with_hicache": (
        "flags",
        [*P128, "--disaggregation-mode", "prefill", "--enable-hierarchical-cache"],
        "--enable-hierarchical-cache",
    ),
    "pd_role_switch": (
        "flags",
        [*P128, "--disaggregation-mode", "prefill", "--enable-pd-role-switch"],
        "--enable-pd-role-switch",
    ),
    "lmcache": ("flags", [*P128, "--enable-lmcache"], "--enable-lmcache"),
    "kv_sharding": ("flags", [*P128, "--enable-kv-cache-sharding"], "--enable-kv-cache-sharding"),
    "torch_compile": ("flags", [*P128, "--enable-torch-compile"], "--enable-torch-compile"),
    "attention_backend": ("flags", [*P128, "--attention-backend", "triton"], "--attention-"),
    "decode_backend": ("flags", [*P128, "--decode-attention-backend", "triton"], "--decode-"),
    "decode_graph_breakable": (
        "flags",
        [*P128, "--cuda-graph-backend-decode", "breakable"],
        "--cuda-graph-backend-decode",
    ),
    "prefill_graph": (
        "flags",
        [*P128, "--cuda-graph-backend-prefill", "full"],
        "--cuda-graph-backend-prefill",
    ),
    "dtype_float32": ("flags", [*P128, "--dtype", "float32"], "--dtype"),
    "negative_sink_pages": ("flags", [*P128, "--kvarn-sink-pages", "-1"], "--kvarn-sink-pages"),
    # 128 running requests (the KVarN default) need 128 filling pages + one shared sink.
    "slots_below_running": ("flags", [*P128, "--kvarn-slots", "128"], "--kvarn-slots"),
    "running_above_slots": (
        "flags",
        [*P128, "--max-running-requests", "300", "--kvarn-slots", "300"],
        "--max-running-requests",
    ),
    "slots_below_running_with_2_sinks": (
        "flags",
        [*P128, "--max-running-requests", "8", "--kvarn-sink-pages", "2", "--kvarn-slots", "9"],
        "--kvarn-sink-pages",
    ),
    "kvarn_flag_without_kvarn": ("without_kvarn", ["--kvarn-slots", "9"], "--kv-cache kvarn"),
    "kvarn_backend_without_kvarn": (
        "without_kvarn",
        ["--attention-backend", "kvarn"],
        "--kv-cache kvarn",
    ),
    "head_dim_80": ("model", "llama_hd80", "--kv-cache kvarn"),
    "hybrid_swa_pool": ("model_config", {"is_hybrid_swa": True}, "--disable-hybrid-swa-memory"),
    "attention_sinks": ("model_config", {"has_attention_sinks": True}, "--kv-cache kvarn"),
    "mla": ("model_config", {"attention_arch": "MLA"}, "--kv-cache kvarn"),
    "hybrid_linear": (
        "model_config",
        {"mamba": True, "hf_config": SimpleNamespace(architectures=["NemotronHForCausalLM"])},
        "--kv-cache kvarn",
    ),
    "encoder_decoder": ("model_config", {"is_encoder_decoder": True}, "--kv-cache kvarn"),
    "v_head_dim": ("model_config", {"v_head_dim": 64}, "--kv-cache kvarn"),
    "tp_splits_kv_heads": ("model_config", {"tp": 3}, "--tp-size"),
    "tp_splits_6_heads_by_4": ("model_config", {"tp": 4, "num_key_value_heads": 6}, "--tp-size"),
    "dp_attention": (
        "flags",
        [*P128, "--enable-dp-attention", "--dp-size", "2", "--tp-size", "2"],
        "--enable-dp-attention",
    ),
    "attn_dp_size": ("flags", [*P128, "--attn-dp-size", "2", "--tp-size", "2"], "--attn-dp-size"),
    "pipeline_parallel": ("flags", [*P128, "--pp-size", "2"], "--pp-size"),
    "two_batch_overlap": ("flags", [*P128, "--enable-two-batch-overlap"], "--enable-two-batch"),
    "pd_multiplexing": ("flags", [*P128, "--enable-pdmux"], "--enable-pdmux"),
    "decode_context_parallel": ("flags", [*P128, "--dcp-size", "2"], "--dcp-size"),
    "attention_context_parallel": (
        "flags",
        [*P128, "--attn-cp-size", "2", "--tp-size", "2"],
        "--attn-cp-size",
    ),
    "streaming_session": ("flags", [*P128, "--enable-streaming-session"], "--enable-streaming"),
    "logit_softcap": ("model", "llama_softcap", "--kv-cache kvarn"),
    "grok_default_softcap": (
        "model_config",
        {"hf_config": SimpleNamespace(architectures=["Grok1ForCausalLM"])},
        "--kv-cache kvarn",
    ),
    "kv_shared_across_layers": ("model", "llama_kv_shared", "--kv-cache kvarn"),
    "non_causal_attention": ("model", "llama_bidirectional", "--kv-cache kvarn"),
    "rocm": ("device", (ROCM, "bfloat16"), "--kv-cache kvarn"),
    "sm75_bf16": ("device", (_gpu((7, 5), "Tesla T4"), "bfloat16"), "--kv-cache kvarn"),
    "sm75_fp16": ("device", (_gpu((7, 5), "Tesla T4"), "float16"), "--kv-cache kvarn"),
    "sm70_fp16": ("device", (_gpu((7, 0), "Tesla V100"), "float16"), "--kv-cache kvarn"),
    "xpu": ("device", (DeviceFacts("xpu"), "bfloat16"), "--device"),
    "metadata_glue_graph": (
        "env",
        ({"SGLANG_ENABLE_METADATA_GLUE_GRAPH": "1"}, ["--cuda-graph-backend-decode", "full"]),
        "SGLANG_ENABLE_METADATA_GLUE_GRAPH",
    ),
    "budget_below_slot_pool": ("budget", SLOT_POOL_64 // 2, "--mem-fraction-static"),
    "budget_below_a_page_each": ("budget", SLOT_POOL_64 + 63 * PACKED_PAGE, "--kvarn-slots"),
}


@pytest.mark.parametrize("kind, arg, flag", list(REFUSAL_MATRIX.values()), ids=list(REFUSAL_MATRIX))
def test_startup_refusal_matrix(prepare, monkeypatch, kind, arg, flag):
    """Every unsupported combination is refused at startup with one line naming the flag to
    change."""
    with pytest.raises(ValueError) as refused:
        _refusal(kind, arg, prepare, monkeypatch)
    message = str(refused.value)
    assert flag in message, message
    assert "\n" not in message and len(message) < 300, message


@pytest.mark.parametrize(
    "model, reason",
    [("llama_softcap", "soft-capping"), ("llama_kv_shared", "KV shared across layers"),
     ("llama_bidirectional", "non-causal")],
)  # fmt: skip
def test_model_refusals_name_the_attention_variant(prepare, model, reason):
    with pytest.raises(ValueError, match=reason):
        prepare("--kv-cache", "kvarn", *P128, model=model).resolve_once()


@pytest.mark.parametrize("model", ["gemma3", "mistral_swa"])
def test_sliding_windows_over_one_pool_are_accepted(prepare, model):
    """Gemma 3's windows mask SGLang's one KV pool (its hybrid SWA pool is off for Gemma 3),
    and the KVarN attention honours each layer's window; SGLang itself ignores Mistral's."""
    sa = prepare("--kv-cache", "kvarn", *P128, model=model)
    sa.resolve_once()
    assert sa.attention_backend == "kvarn"


def test_verified_hybrid_linear_model_is_accepted(monkeypatch):
    """Qwen3-Next (Gated DeltaNet + full attention) serves with KVarN on its full-attention
    layers (``tests/test_server_models.py``); other hybrids stay refused (row ``hybrid_linear``)."""
    from sglang.srt.configs import hybrid_arch

    monkeypatch.setattr(hybrid_arch, "mambaish_config", lambda mc: object())
    qwen3_next = SimpleNamespace(architectures=["Qwen3NextForCausalLM"])
    refuse_model(_model_config(hf_config=qwen3_next, head_dim=256, v_head_dim=256), tp_size=1)


def test_memory_saver_is_accepted(prepare):
    """``--enable-memory-saver`` works with KVarN (``tests/test_memory_saver.py``)."""
    sa = prepare("--kv-cache", "kvarn", *P128, "--enable-memory-saver")
    sa.resolve_once()
    assert sa.enable_memory_saver and sa.attention_backend == "kvarn"


def test_supported_neighbours_of_the_refusals_start(prepare, monkeypatch):
    """The edge of every numeric refusal is accepted."""
    sa = prepare("--kv-cache", "kvarn", *P128, "--kvarn-slots", "129", "--dtype", "bfloat16")
    sa.resolve_once()
    assert sa._kvarn_slots == 129
    sa = prepare("--kv-cache", "kvarn", *P128, "--max-running-requests", "8", "--kvarn-slots", "9")
    sa.resolve_once()
    assert sa.max_running_requests == 8
    from sglang.srt.configs import hybrid_arch

    monkeypatch.setattr(hybrid_arch, "mambaish_config", lambda mc: None)
    refuse_model(_model_config(), tp_size=4)
    refuse_model(_model_config(), tp_size=16)  # heads replicated, never split
    conf = _budget_configurator(monkeypatch, 64)
    enough = SLOT_POOL_64 + 64 * PACKED_PAGE
    assert _calculate_pool_sizes(conf, enough).max_total_num_tokens == 64 * 128


def test_gpus_the_kernels_run_on_start_and_every_gpu_of_the_server_is_checked(prepare, monkeypatch):
    """sm_80 and newer serve both dtypes; the check reads every GPU the server will use (the
    facts are faked at their boundary, ``device_check.device_facts``)."""
    asked = []

    def fake(capabilities):
        def facts(device, gpu_ids):
            asked.append(list(gpu_ids))
            gpus = tuple((i, "GPU", capabilities.get(i, (9, 0))) for i in gpu_ids)
            return DeviceFacts("cuda", None, gpus)

        return facts

    monkeypatch.setattr(device_check, "device_facts", fake({0: (8, 0), 1: (8, 6)}))
    for dtype in ("bfloat16", "float16"):
        prepare("--kv-cache", "kvarn", *P128, "--dtype", dtype, "--tp-size", "2").resolve_once()
    assert asked == [[0, 1], [0, 1]]
    monkeypatch.setattr(device_check, "device_facts", fake({2: (7, 5)}))
    sa = prepare("--kv-cache", "kvarn", *P128, "--tp-size", "2", "--base-gpu-id", "1")
    with pytest.raises(ValueError, match=r"GPU 2 \(GPU\) is 7\.5"):
        sa.resolve_once()
    assert asked[-1] == [1, 2]


def test_scheduler_backend_checks_its_own_device_and_the_glue_graph(monkeypatch):
    """The scheduler's attention backend repeats both checks for the device it runs on (an
    offline engine, a worker whose environment differs from the launcher's)."""
    from kvarn_sglang.serving.backend import KVarNAttnBackend

    cfg = get_preset("k4v2_g64", head_dim=64)
    pool = KVarNTokenToKVPool(
        64 * 4, 64, torch.float16, 1, 64, 1, "cpu", False, kvarn_config=cfg, num_slots=2
    )
    rows = SimpleNamespace(req_to_token=torch.zeros(2, 256, dtype=torch.int32))
    runner = SimpleNamespace(token_to_kv_pool=pool, req_to_token_pool=rows)
    backend = KVarNAttnBackend(runner)  # the CPU reference serves
    monkeypatch.setenv("SGLANG_ENABLE_METADATA_GLUE_GRAPH", "1")
    with pytest.raises(ValueError, match="SGLANG_ENABLE_METADATA_GLUE_GRAPH"):
        backend.init_cuda_graph_state(max_bs=2, max_num_tokens=2)
    monkeypatch.setattr(device_check, "device_facts", lambda d, ids: _gpu((7, 5), "Tesla T4"))
    with pytest.raises(ValueError, match=r"compute capability 8\.0 or newer for a float16"):
        KVarNAttnBackend(runner)


def test_pd_disaggregation_is_accepted(prepare):
    """Both PD roles start with KVarN; a decode server backs retracted requests up in host
    memory and sizes its fp16 slots for a private sink per running request."""
    from kvarn_sglang.serving.settings import settings_of

    sa = prepare("--kv-cache", "kvarn", *P128, "--disaggregation-mode", "prefill")
    sa.resolve_once()
    assert sa.disaggregation_mode == "prefill" and sa.attention_backend == "kvarn"
    sa = prepare("--kv-cache", "kvarn", *PD_DECODE, "--max-running-requests", "8")
    sa.resolve_once()
    assert sa.disaggregation_decode_retraction_backup == "cpu_tensor"
    assert settings_of(sa).num_slots == 16  # 8 x (1 sink page + 1 filling page)


@pytest.fixture
def kvarn_active(monkeypatch):
    settings = KVarNSettings(preset="k4v2_g128", sink_pages=1, max_running_requests=64)
    for module in (models_utils, platform, pool_configurator):
        monkeypatch.setattr(module, "active_settings", lambda: settings)
    return settings


def test_hooks_choose_kvarn_classes_and_turn_fused_kv_writes_off(kvarn_active):
    assert platform.after_get_kv_pool_cls(None, None, kind="mha") is KVarNTokenToKVPool
    assert platform.after_get_paged_allocator_cls(None, None) is KVarNPagedAllocator
    # SGLang resolves the class of every pool kind before it picks the MHA one.
    assert platform.after_get_kv_pool_cls("mla_cls", None, kind="mla") == "mla_cls"
    assert platform.after_get_kv_pool_cls("dsa_cls", None, kind="dsa") == "dsa_cls"
    assert models_utils.around_enable_fused_set_kv_buffer(lambda fb: True, None) is False


def test_hooks_are_inert_without_kvarn(monkeypatch):
    for module in (models_utils, platform):
        monkeypatch.setattr(module, "active_settings", lambda: None)
    assert platform.after_get_kv_pool_cls("orig", None, kind="mha") == "orig"
    assert models_utils.around_enable_fused_set_kv_buffer(lambda fb: True, None) is True
    dtype = kv_cache_dtype.around_configure_kv_cache_dtype(
        lambda **kw: ("auto", torch.bfloat16), server_args_kv_cache_dtype="auto"
    )
    assert dtype == ("auto", torch.bfloat16)


def test_pool_takes_its_config_and_slots_from_the_server_flags(kvarn_active, monkeypatch):
    from kvarn_sglang.serving import pool as pool_module

    monkeypatch.setattr(pool_module, "active_settings", lambda: kvarn_active)
    pool = KVarNTokenToKVPool(128 * 2, 128, torch.float16, 1, 128, 1, "cpu", False)
    assert pool.kvarn_config.name == "k4v2_g128" and pool.kvarn_config.sink_pages == 1
    assert pool.store.num_slots == kvarn_active.num_slots == 64 + 16  # running + 16 sinks
    with pytest.raises(ValueError, match="preset k4v2_g128 needs --page-size 128"):
        KVarNTokenToKVPool(64 * 2, 64, torch.float16, 1, 128, 1, "cpu", False)
    with pytest.raises(ValueError, match="Unsupported head_dim 128/64"):
        KVarNTokenToKVPool(128 * 2, 128, torch.float16, 1, 128, 1, "cpu", False, v_head_dim=64)


def test_kv_dtype_and_capacity_hooks_count_real_bytes(prepare, kvarn_active):
    out = kv_cache_dtype.around_configure_kv_cache_dtype(
        None, server_args_kv_cache_dtype="kvarn", model_dtype=torch.float32
    )
    assert out == ("kvarn", torch.float16)
    kvc = SimpleNamespace(kv_cache_dtype_str="kvarn", kv_cache_dtype=torch.float16,
                          model_config=SimpleNamespace(head_dim=128))  # fmt: skip
    conf = SimpleNamespace(_fixed_overhead_bytes=0)
    fp16_cell = 32 * 8 * 256 * 2  # Llama-3-8B
    assert pool_configurator.after_compute_cell_size(fp16_cell, conf, kvc, 32) == 32 * 8 * 108
    pool_configurator.after_init(None, conf, kvc)
    assert conf._fixed_overhead_bytes == (kvarn_active.num_slots + 1) * 128 * fp16_cell


if __name__ == "__main__":
    test_entry_point_is_declared()
