"""Triton kernels for KVarN (installed as ``kvarn_sglang.kernels``).

One kernel family per file, each with a public launcher that validates its inputs and a
``ref_*`` twin in ``kvarn_sglang.quant.reference``:

* ``commit.commit_pages``: quantize full pages into packed records (quantize on write);
* ``decode.decode_attention``: split-KV decode attention over packed and fp16 pages;
* ``extend.extend_attention``: decode-consistent extend (prefill, chunked prefill, prefix hits).

On a machine without a GPU they run in Triton's interpreter (``TRITON_INTERPRET=1``).
"""
