"""A tiny randomly initialised Llama (GQA) and a byte-level tokenizer for the eval tests.

Everything is built in memory; ``save_tiny_model`` writes it as safetensors + tokenizer files,
so the CLI can load it from a path like a real checkpoint (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HEAD_DIM = 64


def tiny_llama(seed: int = 0, *, layers: int = 2, q_heads: int = 4, kv_heads: int = 2):
    """``LlamaForCausalLM``: hidden 128, ``q_heads`` query heads over ``kv_heads`` KV heads,
    head_dim 64, vocab 256, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger K/V than the default init: attention is not uniform
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def byte_tokenizer():
    """A fast tokenizer with one token per byte (vocab 256, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer to ``path`` (safetensors, HF layout)."""
    tiny_llama(seed).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Run a test single-threaded: the tiny model's ops are far smaller than the cost of
    synchronising threads, which explodes when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
