"""Start and stop a stock ``sglang.launch_server`` process, and talk to it over HTTP.

Used by the real-engine tests, ``scripts/main.sh`` and ``benchmarks/bench_server.py``. On a
machine without a GPU the server runs SGLang's CPU engine (``--device cpu``,
``SGLANG_USE_CPU_ENGINE=1``) with the test-only ``sgl_kernel`` stand-in of
``tests/cpu_engine`` on its ``PYTHONPATH``; nothing else differs from a GPU launch.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_HF = ROOT / ".venv" / "models" / "smollm2-135m"  # written by scripts/setup_env.sh
CPU_STAND_IN = ROOT / "tests" / "cpu_engine"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_engine_env() -> dict[str, str]:
    """Environment of a stock SGLang process on SGLang's CPU engine (see module docstring)."""
    env = dict(os.environ)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(CPU_STAND_IN), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    env.setdefault("HF_HUB_OFFLINE", "1")
    # One torch thread per process: OpenMP threads spin-wait, and two processes sharing the
    # cores that way (a server and its client, or two servers) ran up to 100x slower here.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def http(url: str, payload: dict | None = None, timeout: float = 600.0) -> dict:
    """GET ``url`` (or POST ``payload`` as JSON) and return the decoded JSON answer."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        body = answer.read()
    return json.loads(body) if body.strip() else {}


def prompt_logprobs(server: ServerProcess, ids: list[int]) -> list[float]:
    """Greedy one-token request over ``ids``: the log-probability of each prompt token after
    the first (teacher-forced, from one prefill)."""
    answer = server.generate({
        "input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True, "logprob_start_len": 0,
    })  # fmt: skip
    return [lp for lp, _, _ in answer["meta_info"]["input_token_logprobs"][1:]]


def flush_cache(url: str) -> bool:
    """Ask the server at ``url`` to drop its prefix cache; False while requests still run."""
    request = urllib.request.Request(f"{url}/flush_cache", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            answer.read()
        return True
    except urllib.error.HTTPError:
        return False


def wait_until_flushed(url: str, timeout: float = 300.0) -> None:
    """Flush the prefix cache as soon as the server at ``url`` is idle."""
    deadline = time.monotonic() + timeout
    while not flush_cache(url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} never became idle enough to flush its cache")
        time.sleep(1.0)


class ServerProcess:
    """``python -m sglang.launch_server --model-path MODEL --device cpu ... ARGS`` on a free
    port, with its log in ``log_path``; a context manager that waits until the server
    answers and kills its process group on exit."""

    def __init__(
        self, model: str | Path, args: list[str], log_path: str | Path, *, device: str = "cpu"
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.command = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", str(model),
            "--host", "127.0.0.1", "--port", str(self.port), "--device", device, *args,
        ]  # fmt: skip
        self.env = cpu_engine_env() if device == "cpu" else dict(os.environ)
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sglang.launch_server exited:\n{self.log_tail()}")
            try:
                http(f"{self.url}/model_info", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"sglang.launch_server did not answer in {timeout:.0f} s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def server_info(self) -> dict:
        return http(f"{self.url}/get_server_info")

    def internal_state(self) -> dict:
        """The scheduler's state (``internal_states[0]``): memory usage, KVarN pool."""
        return self.server_info()["internal_states"][0]

    def generate(self, payload: dict, timeout: float = 600.0) -> dict:
        return http(f"{self.url}/generate", payload, timeout=timeout)

    def flush_cache(self) -> bool:
        return flush_cache(self.url)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_all(*servers: ServerProcess) -> None:
    """Start ``servers`` side by side (their startup is mostly imports); if one fails to
    start, all are stopped and its error is raised."""
    errors: list[BaseException] = []

    def start(server: ServerProcess) -> None:
        try:
            server.start()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for server in servers:
            server.stop()
        raise errors[0]


@contextlib.contextmanager
def start_together(*servers: ServerProcess):
    """``start_all`` as a context manager that stops every server on exit."""
    try:
        start_all(*servers)
        yield servers
    finally:
        for server in servers:
            server.stop()
