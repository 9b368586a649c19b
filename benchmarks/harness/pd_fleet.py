"""A small SGLang fleet on one machine: PD disaggregation (a prefill server, a decode server
and ``sglang_router``) or several replicas behind the router.

Used by the PD tests (``tests/test_pd.py``), ``benchmarks/bench_pd_bytes.py`` and
``benchmarks/bench_replicas.py``. Every process is a stock ``python -m sglang.launch_server``
or ``python -m sglang_router.launch_router`` (``server_process.ServerProcess``); on the CPU
test bed they run SGLang's CPU engine with what stock PD needs there
(``pd_env``): mooncake's TCP transport, loopback addresses, and the Debian libraries that
``mooncake-transfer-engine-non-cuda`` loads (``scripts/setup_env.sh`` extracts them into
``.venv/debian``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.harness.server_process import (
    ROOT,
    ServerProcess,
    free_port,
    http,
    start_together,
)

DEBIAN_LIBS = ROOT / ".venv" / "debian"
# Where the Debian packages put their shared objects (usr/lib and lib, multiarch).
_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu",
             "lib/aarch64-linux-gnu")  # fmt: skip


def pd_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` plus what stock SGLang PD needs on one machine (see the module docstring)."""
    env = dict(env)
    libs = [str(DEBIAN_LIBS / d) for d in _LIB_DIRS if (DEBIAN_LIBS / d).is_dir()]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # The transfer engines and the bootstrap server advertise this address to the peer.
    env.setdefault("SGLANG_HOST_IP", "127.0.0.1")
    # A radix hit's cached pages are sent before the forward pass with this on; off, every
    # page of the request travels after the pass (what the fp16 test bed was verified with).
    env.setdefault("SGLANG_DISAGG_PREFILL_EARLY_SEND_CACHED_PREFIX", "0")
    return env


class PDServer(ServerProcess):
    """A PD prefill or decode server (``role``) with the transfer backend ``backend``."""

    def __init__(
        self,
        model,
        role: str,
        args: list[str],
        log_path,
        *,
        backend: str = "mooncake_tcp",
        env: dict[str, str] | None = None,
    ) -> None:
        self.role = role
        self.bootstrap_port = free_port() if role == "prefill" else None
        pd_args = ["--disaggregation-mode", role, "--disaggregation-transfer-backend", backend]
        if role == "prefill":
            pd_args += ["--disaggregation-bootstrap-port", str(self.bootstrap_port)]
        if role == "decode" and "--disaggregation-decode-retraction-backup" not in args:
            # SGLang's default for an fp16 decode server, a HiCache host pool, is sized from
            # free host memory and refuses to start on a small machine; KVarN sets cpu_tensor.
            pd_args += ["--disaggregation-decode-retraction-backup", "cpu_tensor"]
        super().__init__(model, [*pd_args, *args], log_path)
        self.env = pd_env(self.env)
        self.env.update(env or {})

    def pause(self) -> None:
        """Stop every process of the server (SIGSTOP): it holds its state but answers nothing."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """Kill every process of the server at once (SIGKILL): a crash, no clean-up."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


class Router:
    """``python -m sglang_router.launch_router`` on a free port; stopped on exit."""

    def __init__(self, args: list[str], log_path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.command = [
            sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
            "--port", str(self.port), *args,
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    @classmethod
    def pd(cls, prefill: list[PDServer], decode: list[PDServer], log_path) -> Router:
        args = ["--pd-disaggregation", "--mini-lb"]
        for p in prefill:
            args += ["--prefill", p.url, str(p.bootstrap_port)]
        for d in decode:
            args += ["--decode", d.url]
        return cls(args, log_path)

    @classmethod
    def replicas(cls, workers: list[ServerProcess], policy: str, log_path) -> Router:
        return cls(["--worker-urls", *[w.url for w in workers], "--policy", policy], log_path)

    def start(self, timeout: float = 600.0) -> Router:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True, env=dict(os.environ),
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sglang_router exited:\n{self.log_tail()}")
            try:  # any 200 (the router's /health body is not JSON in every mode)
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    answer.read()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"sglang_router did not answer in {timeout:.0f} s")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def generate(self, payload: dict, timeout: float = 600.0) -> dict:
        return http(f"{self.url}/generate", payload, timeout=timeout)

    stop = ServerProcess.stop

    def __enter__(self) -> Router:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def pd_fleet(model, prefill_args: list[str], decode_args: list[str], log_dir, *,
             backend: str = "mooncake_tcp"):  # fmt: skip
    """Start a prefill server, a decode server and a PD router; yield ``(prefill, decode,
    router)`` and stop them all on exit."""
    log_dir = Path(log_dir)
    prefill = PDServer(model, "prefill", prefill_args, log_dir / "prefill.log", backend=backend)
    decode = PDServer(model, "decode", decode_args, log_dir / "decode.log", backend=backend)
    router_log = log_dir / "router.log"
    with start_together(prefill, decode), Router.pd([prefill], [decode], router_log) as router:
        yield prefill, decode, router


def prometheus_sum(url: str, name: str) -> float:
    """The sum of the Prometheus series ``name`` at ``url/metrics`` (all label sets; 0 if
    absent): e.g. ``sglang:kv_transfer_total_mb_sum`` of a server run with
    ``--enable-metrics``."""
    request = urllib.request.Request(f"{url}/metrics")
    with urllib.request.urlopen(request, timeout=30) as answer:
        text = answer.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def handover_bytes(
    tokens: int, *, layers: int, kv_heads: int, head_dim: int, page_size: int,
    page_bytes: int | None, sink_pages: int = 1, elem_bytes: int = 2,
) -> int:  # fmt: skip
    """Bytes a prompt of ``tokens`` moves from prefill to decode, from the pools' descriptors:
    fp16 (``page_bytes`` None) moves every page whole; KVarN its sink pages and partial last
    page as fp16 slots and every other page packed (``kvarn_sglang.serving.pd``)."""
    from kvarn_sglang.serving.pd import fp16_page_positions

    pages = -(-tokens // page_size)
    fp16_page = 2 * layers * kv_heads * page_size * head_dim * elem_bytes
    if page_bytes is None:
        return pages * fp16_page
    fp16 = len(fp16_page_positions(0, tokens, page_size, sink_pages))
    return fp16 * fp16_page + (pages - fp16) * layers * kv_heads * page_bytes
