"""Serving compiles nothing after startup: run as a script, without ``TRITON_INTERPRET``
(``tests/test_kernels_compile.py`` does), on a CPU.

The kernels are compiled for sm_90 by Triton's stand-in driver (``benchmarks.harness.
static_compile``), with a cache hook that records every compilation Triton would make and
skips it (nothing is compiled or launched: the specialization key is what is counted). The
backend's startup ``warm_up`` runs first; then ``SimServer`` drives SGLang's real pool,
allocator and radix cache through the backend's GPU path: prefills in chunks up to 16K
tokens, prefix hits, batched and CUDA-graph-shaped decode across page boundaries. Prints
the startup count and every key first seen while serving (there must be none) as JSON.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.static_compile import compile_for
from kvarn_sglang.format.config import get_preset

G = 128
CONTEXTS = (1, 5, 127, 128, 129, 1000, 4096, 16384)


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"
    from sglang_harness import SimServer

    keys: list[str] = []

    def record(*args, **kwargs):
        keys.append(f"{kwargs['fn'].name}: {kwargs['key']}")
        return True  # skip the compilation and the launch

    cfg = get_preset("k4v2_g128", head_dim=64)
    triton.knobs.runtime.jit_cache_hook = record
    with compile_for(90):
        server = SimServer(
            cfg, num_pages=4 * max(CONTEXTS) // G, num_slots=24, layers=1, hkv=2, group=4,
            max_context=max(CONTEXTS) + 2 * G,
        )  # fmt: skip
        server.pool.store.use_kernels = True
        startup_count, _ = server.backend.warm_up(server.hq)
        startup = set(keys)
        rng = random.Random(0)
        reqs = []
        for n in CONTEXTS:  # prefills in chunks of at most 4096 tokens
            r = server.start([rng.randrange(64) for _ in range(n)])
            while r.kv_len < n:
                assert server.extend([r], [min(4096, n - r.kv_len)])
            reqs.append(r)
        for step in range(G + 2):  # every request crosses a page boundary
            for r in reqs:
                r.tokens.append(step % 64)
            assert server.decode(reqs, graph_bs=16 if step % 2 else None)
        server.finish(reqs[-1])  # a prefix hit on the longest context, then a short extend
        hit = server.start([*reqs[-1].tokens[: max(CONTEXTS)], 1, 2, 3])
        assert hit.cached_len == max(CONTEXTS) // G * G
        assert server.extend([hit], [len(hit.tokens) - hit.cached_len])
    new = sorted(set(keys) - startup)
    print(json.dumps({"startup": startup_count, "new_while_serving": new}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
