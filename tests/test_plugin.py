"""The SGLang plugin: entry point, flags, startup refusals and the hooks' effects (CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvarn_sglang.patches import kv_cache_dtype, models_utils, platform, pool_configurator
from kvarn_sglang.patches.server_args import refuse_model
from kvarn_sglang.pool import KVarNPagedAllocator, KVarNTokenToKVPool
from kvarn_sglang.settings import KVarNSettings


@pytest.fixture(scope="module")
def prepare(tmp_path_factory):
    """``prepare_server_args`` with the plugin loaded through SGLang's own entry points."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from transformers import LlamaConfig, MistralConfig

    load_plugins()
    models = {}
    for name, cfg in {
        "llama": LlamaConfig(head_dim=128, architectures=["LlamaForCausalLM"]),
        "llama_hd80": LlamaConfig(head_dim=80, architectures=["LlamaForCausalLM"]),
        "mistral_swa": MistralConfig(sliding_window=4096, architectures=["MistralForCausalLM"]),
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
    assert any(ep.value == "kvarn_sglang.plugin:register" for ep in eps)


def test_kv_cache_kvarn_selects_the_kvarn_configuration(prepare):
    sa = prepare("--kv-cache", "kvarn", "--page-size", "128")
    assert sa.kv_cache_dtype == "kvarn"
    assert sa._kvarn_preset == "k4v2_g128" and sa._kvarn_sink_pages == 1
    assert sa.attention_backend == "kvarn" and sa.cuda_graph_backend_decode == "disabled"
    assert sa.max_running_requests == 128
    sa.resolve_once()
    from sglang.srt.arg_groups.overrides import resolution_result

    assert resolution_result(sa, "attention_backend") == "kvarn"


def test_kvarn_flags_are_real(prepare):
    sa = prepare("--kv-cache", "kvarn", "--page-size", "64", "--kvarn-preset", "k4v4_g64",
                 "--kvarn-sink-pages", "2", "--kvarn-slots", "300")  # fmt: skip
    assert (sa._kvarn_preset, sa._kvarn_sink_pages, sa._kvarn_slots) == ("k4v4_g64", 2, 300)


def test_plus_presets_are_kvarn_preset_choices(prepare):
    sa = prepare("--kv-cache", "kvarn", "--page-size", "128", "--kvarn-preset", "k2v2_g128_plus")
    assert sa._kvarn_preset == "k2v2_g128_plus"
    from kvarn_sglang.settings import settings_of

    assert settings_of(sa).config(128).refit_iters == 4


def test_without_kvarn_nothing_changes(prepare):
    sa = prepare("--page-size", "128")
    assert sa.kv_cache_dtype == "auto" and not hasattr(sa, "_kvarn_preset")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--page-size", "64"], "needs --page-size 128"),
        (
            ["--page-size", "128", "--speculative-algorithm", "EAGLE"],
            "remove --speculative-algorithm",
        ),
        (
            ["--page-size", "128", "--enable-hierarchical-cache"],
            "remove --enable-hierarchical-cache",
        ),
        (
            ["--page-size", "128", "--disaggregation-mode", "prefill"],
            "remove --disaggregation-mode",
        ),
        (
            ["--page-size", "128", "--attention-backend", "triton"],
            "needs --attention-backend kvarn",
        ),
        (["--page-size", "128", "--cuda-graph-backend-decode", "full"], "CUDA graphs"),
        (["--page-size", "128", "--enable-torch-compile"], "remove --enable-torch-compile"),
    ],
    ids=["page_size", "speculative", "hicache", "pd", "backend", "cuda_graph", "compile"],
)
def test_startup_refuses_unsupported_flags(prepare, flags, message):
    with pytest.raises(ValueError, match=message):
        prepare("--kv-cache", "kvarn", *flags)


@pytest.mark.parametrize(
    "model, message",
    [("llama_hd80", "Unsupported head_dim 80"), ("mistral_swa", "sliding-window")],
)
def test_startup_refuses_unsupported_models(prepare, model, message):
    sa = prepare("--kv-cache", "kvarn", "--page-size", "128", model=model)
    with pytest.raises(ValueError, match=message):
        sa.resolve_once()


def _model_config(**overrides):
    from sglang.srt.configs.model_config import AttentionArch

    base = dict(attention_arch=AttentionArch.MHA, is_hybrid_swa=False, sliding_window_size=None,
                is_encoder_decoder=False, head_dim=128, v_head_dim=128, num_key_value_heads=8,
                hf_config=SimpleNamespace(), hf_text_config=SimpleNamespace())  # fmt: skip
    return SimpleNamespace(**{**base, **overrides})


def test_refuses_mla_and_kv_head_splitting_tensor_parallelism(monkeypatch):
    from sglang.srt.configs import hybrid_arch
    from sglang.srt.configs.model_config import AttentionArch

    monkeypatch.setattr(hybrid_arch, "mambaish_config", lambda mc: None)
    refuse_model(_model_config(), tp_size=4)
    refuse_model(_model_config(), tp_size=16)  # heads replicated, never split
    with pytest.raises(ValueError, match="MLA"):
        refuse_model(_model_config(attention_arch=AttentionArch.MLA), tp_size=1)
    with pytest.raises(ValueError, match="--tp-size 3 splits 8 KV heads"):
        refuse_model(_model_config(), tp_size=3)


@pytest.fixture
def kvarn_active(monkeypatch):
    settings = KVarNSettings(preset="k4v2_g128", sink_pages=1, max_running_requests=64)
    for module in (models_utils, platform, pool_configurator):
        monkeypatch.setattr(module, "active_settings", lambda: settings)
    return settings


def test_hooks_choose_kvarn_classes_and_turn_fused_kv_writes_off(kvarn_active):
    assert platform.after_get_kv_pool_cls(None, None, kind="mha") is KVarNTokenToKVPool
    assert platform.after_get_paged_allocator_cls(None, None) is KVarNPagedAllocator
    with pytest.raises(ValueError, match="MHA pools only"):
        platform.after_get_kv_pool_cls(None, None, kind="mla")
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
    from kvarn_sglang import pool as pool_module

    monkeypatch.setattr(pool_module, "active_settings", lambda: kvarn_active)
    pool = KVarNTokenToKVPool(128 * 2, 128, torch.float16, 1, 128, 1, "cpu", False)
    assert pool.kvarn_config.name == "k4v2_g128" and pool.kvarn_config.sink_pages == 1
    assert pool.store.num_slots == kvarn_active.num_slots == 64 * 2 + 8
    with pytest.raises(ValueError, match="preset k4v2_g128 needs --page-size 128"):
        KVarNTokenToKVPool(64 * 2, 64, torch.float16, 1, 128, 1, "cpu", False)
    with pytest.raises(ValueError, match="Unsupported head_dim 128/64"):
        KVarNTokenToKVPool(128 * 2, 128, torch.float16, 1, 128, 1, "cpu", False, v_head_dim=64)


def test_kv_dtype_and_capacity_hooks_count_real_bytes(kvarn_active):
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
    assert conf._fixed_overhead_bytes == kvarn_active.num_slots * 128 * fp16_cell


if __name__ == "__main__":
    test_entry_point_is_declared()
