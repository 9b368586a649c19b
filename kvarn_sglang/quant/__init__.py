"""The quantizer and its attention semantics in plain torch: the spec every kernel is
tested against.

* ``reference``: per-tile rotation, variance normalization, RTN and packing; decode-
  consistent attention over packed and fp16 pages (``ref_*`` twins of the kernels);
* ``rtn``: asymmetric round-to-nearest and the ``_plus`` presets' least-squares refits;
* ``page_attention``: attention over a paged cache read through any quantizer;
* ``baselines``: other KV quantizers (fp8, KIVI, Hadamard-only RTN) on the same pages;
* ``variants``: beyond-the-paper commit variants measured against the paper's default.
"""
