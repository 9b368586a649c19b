"""KVarN inside SGLang: what ``--kv-cache kvarn`` runs.

* ``settings``: the ``--kvarn-*`` flags; ``model_check``: models and layers KVarN refuses;
  ``capacity``: bytes per token and the fp16 slot pool, for SGLang's pool sizing;
* ``pool``: ``KVarNTokenToKVPool``, SGLang's token-to-KV pool over a ``page_store``
  (packed records plus fp16 slots);
* ``allocator``: ``KVarNPagedAllocator``, SGLang's paged allocator that also hands out and
  takes back fp16 slots, with slot-aware admission (``slot_budget``) and eviction by sink
  (``sink_eviction``);
* ``pages``: a page's life in one place: for a pass, which pages get a new slot, which are
  sinks, which commit from a slot and which commit straight from the new tokens;
* ``forward_plan``: that decision turned into device tensors for one forward pass;
* ``host_pool``, ``hicache``: the host tier of SGLang's hierarchical cache
  (``--enable-hierarchical-cache``): packed page records in host memory (sink pages fp16),
  and the cache controller and stack strategy that SGLang uses for a KVarN pool
  (``docs/hicache.md``);
* ``backend``: ``KVarNAttnBackend``, SGLang's attention backend over the pool;
  ``request_guard``: isolates a request whose K/V turn non-finite.

The hooks into SGLang and the ``sglang.srt.plugins`` entry point that installs them
(``kvarn_sglang.patches.plugin``) sit above this layer: they import it, never the reverse.
"""
