"""Tiny random-weight checkpoints of the model families KVarN serves beyond plain dense
attention, for the real-server tests (test-only; written on first use, nothing downloaded).

Each is a Hugging Face directory (bf16 safetensors, config, a byte-level tokenizer with a plain
chat template, as ``fuzz_model``) that stock SGLang serves on the CPU test bed and transformers
loads for ``kvarn-sglang eval``. The weights are random, so a model's text means nothing: an
accuracy row on one shows consistency (KVarN against the same model's fp16 cache), not quality.

* ``gemma3``: ``Gemma3ForCausalLM``, 4 layers (sliding, sliding, sliding, full) with a window
  of ``GEMMA3_WINDOW`` tokens, 4 query heads over 2 KV heads, head_dim 64. SGLang keeps one
  full KV pool for Gemma 3 (its separate sliding-window pool is off for this family), so the
  window is a mask over that pool.
* ``qwen3_next``: ``Qwen3NextForCausalLM``, 4 layers (3 Gated DeltaNet linear-attention
  layers, then one gated full-attention layer; MoE MLPs of 2 experts, as SGLang builds every
  Qwen3-Next layer sparse), 4 query heads over 2 KV heads,
  head_dim 64 on the full layer; the DeltaNet layers keep SGLang's recurrent state (its mamba
  pool), the full layer's K/V are what KVarN stores.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness.fuzz_model import CHAT_TEMPLATE

VOCAB = 256
GEMMA3_WINDOW = 100  # Hugging Face's sliding_window: a query reads itself and 99 keys before


def _byte_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, chat_template=CHAT_TEMPLATE, bos_token="\x01", eos_token="\x02"
    ).save_pretrained(path)


def _sharpen(model, eos: int):
    """Attention far from uniform (a window that is ignored changes the output) and logits
    spread wide (std about 4.5: the final norm scales by 20), so that greedy decoding is not
    a string of near-ties; EOS (a zero embedding row: logit 0) practically never wins."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
                module.q_proj.weight.mul_(4.0)
                module.k_proj.weight.mul_(4.0)
        model.model.norm.weight.fill_(19.0)  # Gemma's RMSNorm scales by 1 + weight
        model.get_input_embeddings().weight[eos] = 0.0
    return model


def write_gemma3(path: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny Gemma 3 (see the module docstring) to ``path``; returns it."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
        sliding_window=GEMMA3_WINDOW, max_position_embeddings=4096,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        architectures=["Gemma3ForCausalLM"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = _sharpen(Gemma3ForCausalLM(config).eval(), config.eos_token_id)
    path = Path(path)
    model.to(torch.bfloat16).save_pretrained(path)
    _byte_tokenizer(path)
    return path


def write_qwen3_next(path: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny Qwen3-Next (see the module docstring) to ``path``; returns it."""
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    config = Qwen3NextConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32, linear_conv_kernel_dim=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"], full_attention_interval=4,
        num_experts=2, num_experts_per_tok=1, moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
        max_position_embeddings=4096, architectures=["Qwen3NextForCausalLM"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    model = Qwen3NextForCausalLM(config).eval()
    with torch.no_grad():  # logits spread as the other tiny models' (std about 4.5)
        head = model.lm_head.weight
        head.mul_(4.5 / float(head.std() * 128**0.5))
        head[config.eos_token_id] = 0.0
    path = Path(path)
    model.to(torch.bfloat16).save_pretrained(path)
    _byte_tokenizer(path)
    return path


WRITERS = {"gemma3": write_gemma3, "qwen3_next": write_qwen3_next}


if __name__ == "__main__":
    import sys

    print(WRITERS[sys.argv[1]](sys.argv[2]))
