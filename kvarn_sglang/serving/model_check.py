"""Attention layers that KVarN cannot serve, found in the model SGLang loaded.

``patches.server_args.refuse_model`` refuses, in the launcher, what a model's config
declares. This is the second line, in each scheduler process at startup: the
``KVarNAttnBackend`` is built after the model, so it reads the ``RadixAttention`` layers
SGLang actually built and refuses, before the first request, a layer whose semantics the
KVarN pages and attention do not implement:

* attention logit soft-capping (``logit_cap > 0``: Grok's 30, Gemma 2's 50), which the KVarN
  attention would silently ignore;
* encoder-only or bidirectional attention (``AttentionType`` other than ``DECODER``) and
  cross-attention: KVarN attention is causal, decode-consistent self-attention;
* chunked local attention (``use_irope``, Llama 4): its mask restarts every chunk, which the
  KVarN attention does not implement (a sliding window, ``sliding_window_size``, it does);
* KV shared across layers: two ``RadixAttention`` layers with one ``layer_id``, or a layer
  marked ``is_kv_shared_layer`` (Gemma 3n/4). Such layers read another layer's cache with
  ``save_kv_cache=False``; they used to fail at the first forward instead of at startup.
"""

from __future__ import annotations

SERVE = "serve this model without --kv-cache kvarn"


def refuse_unsupported_layers(model) -> None:
    """Raise ``ValueError`` naming the first layer of ``model`` (a ``torch.nn.Module``) that
    KVarN cannot serve (see the module docstring)."""
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention

    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if getattr(module, "is_kv_shared_layer", False):
            raise ValueError(
                f"--kv-cache kvarn does not support KV shared across layers ({name} reads "
                f"another layer's cache): {SERVE}"
            )
        if not isinstance(module, RadixAttention):
            continue
        problem = None
        if (module.logit_cap or 0) > 0:
            problem = f"attention logit soft-capping (logit_cap {module.logit_cap})"
        elif module.attn_type != AttentionType.DECODER:
            problem = f"{module.attn_type.value} attention (KVarN attention is causal)"
        elif module.is_cross_attention:
            problem = "cross-attention"
        elif getattr(module, "use_irope", False):
            problem = "chunked local attention"
        elif module.layer_id in owners:
            problem = (
                f"KV shared across layers (layer_id {module.layer_id} also serves "
                f"{owners[module.layer_id]})"
            )
        if problem is not None:
            raise ValueError(f"--kv-cache kvarn does not support {problem} in {name}: {SERVE}")
        owners[module.layer_id] = name
