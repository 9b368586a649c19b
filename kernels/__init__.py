"""Triton kernels for KVarN (installed as ``kvarn_sglang.kernels``).

One kernel family per file, each with a public launcher that validates its inputs and a
``ref_*`` twin in ``kvarn_sglang.reference``. The kernels land with the kernels issue; until
then every path runs through the torch reference.
"""
