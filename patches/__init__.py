"""Hooks that change SGLang's behaviour (installed as ``kvarn_sglang.patches``).

One module per SGLang component hooked, each naming its exact upstream target (dotted path)
and the pinned version, sglang==0.5.23. They land with the SGLang integration issue.
"""
