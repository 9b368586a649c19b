"""SGLang's own benchmark client, ``python -m sglang.benchmark.serving``, against a running
server, and our agentic workload written as the client's agentic trace.

SGLang users and reviewers compare serving numbers with that client, so
``benchmarks/bench_sglang_serving.py`` runs it unchanged next to our own client
(``server_workload``) and records its JSON beside ours:

* ``--dataset-name generated-shared-prefix``: SGLang's prefix-sharing benchmark (groups of
  prompts that share a generated system prompt), sent with ``--backend sglang`` (``/generate``);
* ``--dataset-name agentic-trace``: multi-turn conversations replayed round by round, each
  round's history holding the server's real replies, sent with ``--backend sglang-oai-chat``
  (``/v1/chat/completions``) from a local trace JSON that ``agentic_trace`` writes from our
  seeded agentic workload (``workloads.make_workload``).

The client runs in a subprocess with ``HOME`` pointed at a fresh directory: it caches the
prompts it generates under ``~/.cache/sglang/benchmark`` keyed by sizes, seed and tokenizer
*class*, so a cache left by another model's tokenizer would otherwise be reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness.workloads import Spec, Workload, describe

CLIENT = [sys.executable, "-m", "sglang.benchmark.serving"]


@dataclass(frozen=True)
class SharedPrefixSizes:
    """Sizes of ``--dataset-name generated-shared-prefix`` (lengths in tokens)."""

    groups: int
    prompts_per_group: int
    system_prompt_len: int
    question_len: int
    output_len: int

    def args(self) -> list[str]:
        return [
            "--dataset-name", "generated-shared-prefix",
            "--gsp-num-groups", str(self.groups),
            "--gsp-prompts-per-group", str(self.prompts_per_group),
            "--gsp-system-prompt-len", str(self.system_prompt_len),
            "--gsp-question-len", str(self.question_len),
            "--gsp-output-len", str(self.output_len),
        ]  # fmt: skip


# A CPU-sized run (SmolLM2-135M on 2 cores), and SGLang's own defaults for a GPU.
CPU_SHARED_PREFIX = SharedPrefixSizes(4, 4, 400, 32, 16)
GPU_SHARED_PREFIX = SharedPrefixSizes(64, 16, 2048, 128, 256)


def client_command(
    url: str,
    dataset_args: Sequence[str],
    output_file: str | Path,
    *,
    backend: str = "sglang",
    concurrency: int = 4,
    seed: int = 0,
    warmup_requests: int = 1,
) -> list[str]:
    """The client's command line: ``dataset_args`` against ``url``, the prefix cache flushed
    after the warm-up (so the measured hits are the run's own), cache hits reported, the
    result appended to ``output_file`` as one JSON line."""
    return [
        *CLIENT, "--backend", backend, "--base-url", url, *dataset_args,
        "--max-concurrency", str(concurrency), "--seed", str(seed),
        "--warmup-requests", str(warmup_requests), "--flush-cache", "--cache-report",
        "--disable-tqdm", "--output-file", str(output_file),
    ]  # fmt: skip


def run_client(command: list[str], timeout: float = 3600.0) -> dict:
    """Run ``client_command``'s ``command`` and return the result it wrote (SGLang's JSON,
    without ``server_info``: the caller records the server), with ``command`` added."""
    output_file = Path(command[command.index("--output-file") + 1])
    output_file.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="sglang-client-") as home:
        env = dict(os.environ, HOME=home, HF_HUB_OFFLINE="1")
        env.setdefault("OMP_NUM_THREADS", "1")
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    if done.returncode != 0 or not output_file.exists():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise RuntimeError(f"sglang.benchmark.serving failed ({done.returncode}):\n{tail}")
    result = json.loads(output_file.read_text().splitlines()[-1])
    result.pop("server_info", None)
    display = ["python", *command[1:]] if command[0] == sys.executable else command
    return {"command": " ".join(display), **result}


def _path(leaf: Spec) -> list[Spec]:
    path = []
    node: Spec | None = leaf
    while node is not None:
        path.append(node)
        node = node.parent
    return path[::-1]


def agentic_trace(workload: Workload, decode: Callable[[Sequence[int]], str]) -> dict:
    """``workload`` in the agentic-trace format of ``sglang.benchmark.datasets.agentic_trace``:
    ``{"metadata": ..., "conversations": [[{"messages": [...], "prompt_tokens": N}, ...]]}``,
    each turn holding only the messages new in that round (the client adds the server's
    replies to the history itself).

    A conversation is one path from a task's first turn to a leaf; a request that generates
    is a round. A warm-up prefix (an agent's system prompt and tools, a few-shot prefix) is
    the first round's system message, decoded once so every task shares its text; the rest of
    a segment (task message, tool output, question) is a user message. A prefill-only request
    (the shared prompt of a fork) carries its message into the next round. The format is
    linear, so a fork of b branches becomes b conversations whose rounds up to the fork are the
    same (re-sent; the prefix cache serves them), and branches that differ only by sampling
    get ``[sample i]`` at the end of their message, so that greedy replies differ too. The
    client fixes one output length per round (``--sharegpt-output-len``): the per-request
    lengths of the workload are not kept.
    """
    prefixes = [(list(w.segment), decode(w.segment)) for w in workload.warmup]
    conversations = []
    for leaf in (s for s in workload.specs() if not s.children):
        turns, pending = [], []
        for spec in _path(leaf):
            segment = list(spec.segment)
            if spec.parent is None:
                for ids, text in prefixes:
                    if ids and segment[: len(ids)] == ids:
                        pending.append({"role": "system", "content": text})
                        segment = segment[len(ids) :]
                        break
            if segment:
                pending.append({"role": "user", "content": decode(segment)})
            elif spec.parent is not None and len(spec.parent.children) > 1:
                tag = f"[sample {spec.parent.children.index(spec) + 1}]"
                if pending:
                    pending[-1] = {**pending[-1], "content": f"{pending[-1]['content']}\n{tag}"}
                else:
                    pending.append({"role": "user", "content": tag})
            if spec.gen_len:
                turns.append({"messages": pending, "prompt_tokens": len(spec.prompt())})
                pending = []
        if turns:
            conversations.append(turns)
    metadata = {
        "source": "kvarn-sglang benchmarks/harness/workloads.py",
        "shape": describe(workload),
        "conversations": len(conversations),
        "rounds": sum(len(c) for c in conversations),
    }
    return {"metadata": metadata, "conversations": conversations}


def write_agentic_trace(workload: Workload, tokenizer_path: str | Path, path: str | Path) -> dict:
    """Write ``agentic_trace(workload)`` to ``path``, token ids decoded with the served
    model's tokenizer (special tokens skipped); returns the trace's metadata."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    trace = agentic_trace(workload, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(trace) + "\n")
    return trace["metadata"]


def agentic_trace_args(path: str | Path, conversations: int, output_len: int) -> list[str]:
    """The client's dataset arguments for a trace written by ``write_agentic_trace``."""
    return [
        "--dataset-name", "agentic-trace", "--dataset-path", str(path),
        "--num-prompts", str(conversations), "--sharegpt-output-len", str(output_len),
    ]  # fmt: skip
