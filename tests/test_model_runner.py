"""Stock SGLang's model runner with ``--kv-cache kvarn``, in one process (no server).

``tests/cpu_engine/model_runner_decode.py`` builds the runner as
``python -m sglang.benchmark.one_batch`` does: SGLang's ``KVCacheConfigurator`` builds the
pool and allocator the plugin's hooks choose, with the layer range SGLang passes
(``end_layer`` exclusive), and the attention backend comes from SGLang's registry. It
prefills two requests of a 4-layer Llama, decodes them across three page boundaries with
SGLang's ``ScheduleBatch``/``ForwardBatch`` and frees them. A few seconds of compute: the
fast check that the real construction path and the slot lifecycle fit together (the slot
leak of an exclusive ``end_layer`` was invisible to tests that built the pool themselves).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_llama import byte_tokenizer, tiny_llama

from benchmarks.harness.server_process import cpu_engine_env

SCRIPT = Path(__file__).parent / "cpu_engine" / "model_runner_decode.py"
pytestmark = pytest.mark.server


def test_sglang_model_runner_decodes_across_pages_and_returns_every_slot(tmp_path):
    model = tiny_llama(0, layers=4).to(torch.bfloat16)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "100", "300", "2"],
        env=cpu_engine_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    got = json.loads(lines[-1].removeprefix("RESULT "))
    assert (got["pool"], got["allocator"], got["backend"]) == (
        "KVarNTokenToKVPool", "KVarNPagedAllocator", "KVarNAttnBackend",
    )  # fmt: skip
    assert (got["layers"], got["start_layer"], got["end_layer"]) == (4, 0, 4)
    assert got["page_boundaries_crossed"] == 3
    # Two requests hold a sink slot and a filling slot each, never more.
    assert got["slots_held_max"] == got["slots_held_last"] == 4
    assert got["commits_per_completed_page"] == [1] and got["sink_commits"] == [0]
    assert got["slots_free_after"] == got["slots_total"]
    assert got["pages_free_after"] == got["pages_total"]
    assert got["violations"] == []
    # SGLang's ReqToTokenPool: exactly --max-running-requests rows can hold KV; the extra
    # row 0 is padding that is never allocated (CUDA-graph padded rows read it, and their
    # pages are page 0, which points at the scratch slot), so the slot minimum
    # (--max-running-requests + --kvarn-sink-pages) counts every request that can hold KV.
    assert got["request_rows"] == got["max_running_requests"] == 4
    assert got["row_table_rows"] == 5 and got["rows_allocatable"] == 4
    assert not got["row0_allocatable"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
