"""A tiny Llama checkpoint for the server fuzzer and the request-isolation tests (test-only).

Random weights (hidden 128, 4 query / 2 KV heads, head_dim 64, vocab 256, a byte tokenizer
with a plain chat template), so a CPU server serves it fast, with one planted defect that a
real checkpoint can have: layer 0's K projection overflows for one token. The embedding of
``POISON_TOKEN`` is a one-hot on channel ``POISON_CHANNEL``, which no other token uses, and
that column of layer 0's ``k_proj`` is 1e38; after the RMSNorm the channel is about 11, so
the token's K is Inf (then NaN after RoPE) while every other token's K is untouched (the
channel is exactly 0 for them in layer 0). So any request that contains the token, or
samples it (a ``logit_bias`` forces that), writes non-finite K in layer 0.

The token is never sampled by chance: its ``lm_head`` row is zero and the other rows are
scaled so that logits spread over about +-30, which leaves it a probability below 1e-10 at
temperature 1. The end-of-sequence token's row is zero too, so a request generates all of its
``max_new_tokens``: SGLang admits requests on an estimate of their output that assumes they
may stop early, so long generations outgrow the pool and SGLang retracts requests.
"""

from __future__ import annotations

from pathlib import Path

POISON_TOKEN = 250
POISON_CHANNEL = 7
VOCAB = 256
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def write_fuzz_model(path: str | Path, *, layers: int = 2, seed: int = 0) -> Path:
    """Write the checkpoint (bf16 safetensors, config, tokenizer) to ``path``; returns it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=2048, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # attention that is not uniform
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
        embed = model.model.embed_tokens.weight
        embed[:, POISON_CHANNEL] = 0.0
        embed[POISON_TOKEN] = 0.0
        embed[POISON_TOKEN, POISON_CHANNEL] = 1.0
        model.model.layers[0].self_attn.k_proj.weight[:, POISON_CHANNEL] = 1e38
        model.lm_head.weight.mul_(60.0)
        model.lm_head.weight[POISON_TOKEN] = 0.0
        model.lm_head.weight[config.eos_token_id] = 0.0
    path = Path(path)
    model.to(torch.bfloat16).save_pretrained(path)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE).save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(write_fuzz_model(sys.argv[1]))
