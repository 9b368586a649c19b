"""Drive stock SGLang's model runner with ``--kv-cache kvarn`` in one process (no server).

Run by ``tests/test_model_runner.py`` in a subprocess with the CPU engine's environment
(``benchmarks.harness.server_process.cpu_engine_env``). It builds the runner the way
``python -m sglang.benchmark.one_batch`` does (SGLang's own ``load_model``: ``ModelRunner``,
``KVCacheConfigurator``, the pool and allocator classes the plugin's hooks choose, the
attention backend registry), prefills a batch, decodes it across several page boundaries
with SGLang's own ``ScheduleBatch``/``ForwardBatch``, frees the requests as the scheduler
does, and prints one JSON line of what the pool saw.

Usage: ``python model_runner_decode.py MODEL_DIR PROMPT_LEN DECODE_STEPS BATCH``.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(model: str, prompt_len: int, steps: int, batch: int) -> dict:
    from sglang.benchmark.one_batch import (
        _init_process_global_configs,
        load_model,
        prepare_synthetic_inputs_for_latency_test,
    )
    from sglang.srt.plugins import load_plugins
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import PortArgs, prepare_server_args

    load_plugins()
    server_args = prepare_server_args(
        ["--model-path", model, "--device", "cpu", "--kv-cache", "kvarn", "--page-size", "128",
         "--dtype", "bfloat16", "--max-total-tokens", "8192", "--max-running-requests", "4"]
    )  # fmt: skip
    server_args.resolve_once()
    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))
    _init_process_global_configs()
    port_args = PortArgs.init_new(server_args)
    runner, _ = load_model(server_args, port_args, 0, 0)
    model_runner = runner.torch_runner
    pool = model_runner.token_to_kv_pool
    allocator = model_runner.token_to_kv_pool_allocator
    store = pool.store
    prompts = torch.randint(1, 200, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    reqs = prepare_synthetic_inputs_for_latency_test(batch, prompt_len, prompts.tolist())
    row_pool = model_runner.req_to_token_pool
    rows_free = list(row_pool.free_slots)  # before any request takes a row
    started = time.perf_counter()
    next_ids, _, sched_batch = runner.extend(reqs)
    held = [store.num_slots - store.free_slots]
    for _ in range(steps):
        next_ids, logits = runner.decode(next_ids, sched_batch)
        held.append(store.num_slots - store.free_slots)
        if not torch.isfinite(logits).all():
            raise RuntimeError("non-finite logits")
    seconds = time.perf_counter() - started
    seq_len = prompt_len + steps + 1  # the token sampled last is not in the cache yet
    rows = sched_batch.req_pool_indices.tolist()
    pages = model_runner.req_to_token_pool.req_to_token[rows, : seq_len - 1 : 128] // 128
    complete = (seq_len - 1) // 128
    commits = store.commits[pages[:, 1:complete]].flatten().tolist()
    sink_commits = store.commits[pages[:, 0]].tolist()
    for row in rows:  # what the scheduler does when a request finishes without a radix cache
        allocator.free(model_runner.req_to_token_pool.req_to_token[row, : seq_len - 1])
    store.flush_released()
    return {
        "pool": type(pool).__name__,
        "allocator": type(allocator).__name__,
        "backend": type(model_runner.attn_backend).__name__,
        "layers": pool.layer_num,
        "start_layer": pool.start_layer,
        "end_layer": pool.end_layer,
        "slots_total": store.num_slots,
        "slots_held_max": max(held),
        "slots_held_last": held[-1],
        "slots_free_after": store.free_slots,
        "pages_free_after": allocator.available_size() // 128,
        "pages_total": allocator.size // 128,
        "page_boundaries_crossed": complete - (prompt_len // 128),
        "commits_per_completed_page": sorted(set(commits)),
        "sink_commits": sorted(set(sink_commits)),
        "violations": allocator.verify_byte_accounting(),
        # How many request rows can hold KV at once (the slot minimum counts them).
        "max_running_requests": model_runner.max_running_requests,
        "request_rows": model_runner.req_to_token_pool.size,
        "row_table_rows": model_runner.req_to_token_pool.req_to_token.shape[0],
        "rows_allocatable": len(rows_free),
        "row0_allocatable": 0 in rows_free,
        "forward_seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    model_dir, prompt_len, steps, batch = sys.argv[1], *map(int, sys.argv[2:5])
    print("RESULT", json.dumps(main(model_dir, prompt_len, steps, batch)))
