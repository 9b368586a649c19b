"""The KVarN format: presets, the packed page record, and the numbers every implementation
shares (the torch reference, the Triton kernels and the baselines alike).

* ``config``: ``KVarNConfig`` and the named presets (bits, page size, sink pages, refits);
* ``layout``: where codes and fp16 metadata sit in a page record, and (un)packing of codes;
* ``numerics``: the normalization's clip bounds, the Hadamard matrix, the input check of
  pages, and ``PagedKVCache`` (a layer's packed records and fp16 slots, as kernels take it).
"""
