"""Stock SGLang servers shared by the whole test run: started once, not once per test file.

Most of the real-engine tests' time is server start-up (imports, model load, pool
allocation), so a server is identified by what it serves and its flags (``ServerSpec``) and
the session-wide ``ServerPool`` (the ``server_pool`` fixture of ``conftest.py``) starts it
the first time a test asks for it and hands the same process to every later test that asks
for the same spec. At most ``MAX_ALIVE`` servers run at once (each holds its KV pool in
memory; CI has 24 GiB): asking for another stops the least recently used one, which is
started again if a later test needs it. ``get`` starts several servers side by side (start-up
is mostly imports).

A shared server carries state from earlier tests: its prefix cache (ask with ``fresh=True``
to flush it once it is idle), its counters (compare them before and after, never against 0)
and its log (checks such as "no leak reported" then cover every earlier test too). A test
that kills, restarts or breaks its server starts its own ``ServerProcess`` instead.

The specs every test file shares are defined here; a test that needs other flags defines its
own ``ServerSpec`` next to it and gets it from the same pool.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from benchmarks.harness.server_fuzz import FUZZ_ARGS
from benchmarks.harness.server_process import (
    SMOLLM2_HF,
    ServerProcess,
    start_all,
    wait_until_flushed,
)

MAX_ALIVE = 3


@dataclass(frozen=True)
class ServerSpec:
    """A server: ``model`` (a path, or the name of a model the pool builds on first use, see
    ``ServerPool.models``) served with ``args`` by ``python -m sglang.launch_server``."""

    name: str
    model: str | Path
    args: tuple[str, ...]


# SmolLM2-135M with KVarN on the fewest fp16 slots the plugin accepts for 4 running requests
# (4 filling pages + 1 sink page): a cached prefix's sink competes with running requests for
# slots, and admission makes requests wait for them.
SMOLLM2_KVARN = ServerSpec(
    "smollm2_kvarn",
    SMOLLM2_HF,
    (
        "--kv-cache", "kvarn", "--page-size", "128", "--max-total-tokens", "262144",
        "--max-running-requests", "4", "--kvarn-slots", "5",
        "--sleep-on-idle", "--skip-server-warmup", "--random-seed", "0", "--enable-cache-report",
    ),
)  # fmt: skip
# The same model on SGLang's own fp16 KV cache (its reference CPU attention backend).
SMOLLM2_FP16 = ServerSpec(
    "smollm2_fp16",
    SMOLLM2_HF,
    (
        "--attention-backend", "torch_native", "--max-total-tokens", "65536",
        "--max-running-requests", "4", "--sleep-on-idle", "--skip-server-warmup",
        "--random-seed", "0",
    ),
)  # fmt: skip
# The fuzzer's tiny checkpoint (one token makes layer 0's K non-finite) on a pool made to run
# short (``benchmarks.harness.server_fuzz.FUZZ_ARGS``).
FUZZ_KVARN = ServerSpec("fuzz_kvarn", "fuzz_model", tuple(FUZZ_ARGS))


def _write_fuzz_model(directory: Path) -> Path:
    from benchmarks.harness.fuzz_model import write_fuzz_model

    return write_fuzz_model(directory / "fuzz_model")


class ServerPool:
    """Servers of the test run by spec (see the module docstring)."""

    # Models built on first use, by name: ``fn(directory) -> model path``.
    models: ClassVar[dict[str, Callable[[Path], Path]]] = {"fuzz_model": _write_fuzz_model}

    def __init__(self, directory: Path, max_alive: int = MAX_ALIVE) -> None:
        self.directory = directory
        self.max_alive = max_alive
        self._alive: OrderedDict[ServerSpec, ServerProcess] = OrderedDict()
        self._built: dict[str, Path] = {}

    def model_path(self, model: str | Path) -> Path:
        if isinstance(model, str) and model in self.models:
            if model not in self._built:
                self._built[model] = self.models[model](self.directory)
            return self._built[model]
        path = Path(model)
        if path == SMOLLM2_HF and not (path / "model.safetensors").exists():
            pytest.fail(f"{path} is missing: run scripts/setup_env.sh (it exports SmolLM2)")
        return path

    def get(self, *specs: ServerSpec, fresh: bool = False):
        """The running server of each spec (one server, or a tuple for several), starting
        those not running side by side; ``fresh`` flushes their prefix caches first."""
        for spec in specs:
            if spec in self._alive:
                if not self._alive[spec].alive():
                    raise RuntimeError(
                        f"shared server {spec.name} died during an earlier test:\n"
                        f"{self._alive[spec].log_tail()}"
                    )
                self._alive.move_to_end(spec)
        missing = [s for s in specs if s not in self._alive]
        while self._alive and len(self._alive) + len(missing) > self.max_alive:
            stale = next(s for s in self._alive if s not in specs)
            self._alive.pop(stale).stop()
        self._start(missing)
        servers = tuple(self._alive[s] for s in specs)
        if fresh:
            for server in servers:
                wait_until_flushed(server.url)
        return servers[0] if len(servers) == 1 else servers

    def _start(self, specs: list[ServerSpec]) -> None:
        started = {
            spec: ServerProcess(
                self.model_path(spec.model), list(spec.args), self.directory / f"{spec.name}.log"
            )
            for spec in specs
        }
        start_all(*started.values())
        self._alive.update(started)

    def stop_all(self) -> None:
        while self._alive:
            self._alive.popitem()[1].stop()
