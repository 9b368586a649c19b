"""SGLang's scheduler-process configuration, published in this process without a model.

SGLang's scheduling classes (``PrefillAdder``, ``SchedulePolicy``, ``ScheduleBatch``,
``Req``) read the server's configuration from the process-wide runtime context that every
scheduler process publishes at startup. ``scheduler_context`` does the same from a model
*config* only (``config.json``; no weights are loaded), so those classes run as shipped in a
test or a benchmark, and clears it on exit. The KVarN plugin is loaded through SGLang's entry
points first, so its hooks (the slot-aware admission on ``PrefillAdder.add_one_req`` among
them) are applied exactly as in a server.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path


def write_llama_config(
    path: str | Path, *, layers: int, kv_heads: int, head_dim: int, vocab: int = 128256
) -> str:
    """A Llama ``config.json`` of the given KV shape (no weights), e.g. Llama-3-8B's."""
    from transformers import LlamaConfig

    heads = kv_heads * 4
    cfg = LlamaConfig(
        hidden_size=heads * head_dim, intermediate_size=4 * heads * head_dim,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, vocab_size=vocab, max_position_embeddings=131072,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    cfg.save_pretrained(path)
    return str(path)


@contextlib.contextmanager
def scheduler_context(flags: list[str], model_dir: str | Path | None = None):
    """Publish ``ServerArgs`` from ``flags`` (``--model-path`` is ``model_dir``, default a
    small Llama config with head_dim 64) as a scheduler process does; yields them."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            model_dir = write_llama_config(tmp, layers=2, kv_heads=2, head_dim=64, vocab=1000)
        args = prepare_server_args(["--model-path", str(model_dir), "--device", "cpu", *flags])
        args.resolve_once()
        publish(args, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))
        try:
            yield args
        finally:
            reset_context()
