"""What does SGLang's hierarchical cache buy KVarN on agent sessions that do not fit on the device?

A multi-turn agentic workload (``benchmarks.harness.agent_sessions``): ``--sessions`` agents
share a system prompt (``--system`` tokens) and each has its own task (``--task`` tokens); a
turn answers (``--gen`` tokens), then the agent appends a tool result (``--tool`` tokens) and
asks again. Turns run round by round: between two turns of a session every other session
takes its turn (the idle gap of an agent waiting on its tool), ``--concurrency`` requests at
a time. The sessions together need more pages than the device pool has.

Two stock SGLang servers with ``--kv-cache kvarn`` and the same device pool serve it, one with
``--enable-hierarchical-cache --hicache-ratio R``, one without. Reported per server: the
cached-token rate, the prompt tokens recomputed, the turns whose whole previous context was
still cached (the session stayed resident across device and host), and the bytes and pages
moved each way (``/get_server_info``). SGLang's fp16 host pool does not run on CPU, so the
fp16 HiCache figures are computed on paper from the same bytes: the tokens an fp16 host tier
of the same bytes holds, the cached-token rate that a page-level model of the cache
(``benchmarks.harness.hicache_sim``) predicts for it on the same request trace (the same
model is checked against the KVarN run), and the bytes the same page moves would take.

    python -m benchmarks.bench_hicache --output benchmarks/results/hicache_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness.agent_sessions import hicache_state, make_sessions, run_turn, text_tokens
from benchmarks.harness.common import result_header, write_result
from benchmarks.harness.hicache_sim import PageCosts, PrefixCacheModel, replay
from benchmarks.harness.server_process import SMOLLM2_HF, ServerProcess, http

G = 128
LOGS = Path(tempfile.gettempdir()) / "bench_hicache"


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system", type=int, default=256, help="shared system prompt tokens")
    p.add_argument("--task", type=int, default=200, help="tokens of each session's task")
    p.add_argument("--tool", type=int, default=64, help="tool-result tokens per turn")
    p.add_argument("--gen", type=int, default=16, help="tokens generated per turn")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--device-tokens", type=int, default=2048, help="--max-total-tokens")
    p.add_argument("--hicache-ratio", type=float, default=4.0)
    p.add_argument("--start-timeout", type=float, default=1800, help="seconds per server start")
    p.add_argument("--output", default=None)
    return p.parse_args(argv)


def _server_args(args, hicache: bool) -> list[str]:
    out = [
        "--kv-cache", "kvarn", "--page-size", str(G), "--max-total-tokens",
        str(args.device_tokens), "--max-running-requests", str(args.concurrency),
        "--sleep-on-idle", "--skip-server-warmup", "--random-seed", "0", "--enable-cache-report",
    ]  # fmt: skip
    if hicache:
        out += ["--enable-hierarchical-cache", "--hicache-ratio", str(args.hicache_ratio)]
    return out


def _workload(args):
    """Sessions (shared system prompt + own task) and each turn's tool result."""
    text = text_tokens()
    system = text[: args.system]
    sessions = make_sessions(args.sessions, args.task, stride=37)
    for s in sessions:
        s.history = system + s.history
    span = len(text) - args.tool
    tools = {
        (s.sid, t): text[(s.sid * 53 + t * 97) % span :][: args.tool]
        for s in sessions
        for t in range(args.turns)
    }
    return sessions, tools


def _serve(url: str, args) -> dict:
    sessions, tools = _workload(args)
    trace, rows = [], []
    start = time.monotonic()
    for turn in range(args.turns):

        def one(s, turn=turn):
            prompt_len = len(s.history) + (len(tools[s.sid, turn]) if turn else 0)
            cached, out, seconds = run_turn(url, s, args.gen, tools[s.sid, turn])
            return s, prompt_len, cached, out, seconds

        with ThreadPoolExecutor(args.concurrency) as pool:
            for s, prompt_len, cached, out, seconds in pool.map(one, sessions):
                prompt = s.history[:prompt_len]
                previous = s.turns[-2] if len(s.turns) > 1 else None
                # The whole previous context (its prompt and answer) still cached?
                kept = None
                if previous is not None:
                    kept = cached >= (previous[0] + len(previous[2]) - 1) // G * G
                trace.append((prompt, out))
                rows.append((s.sid, turn, prompt_len, cached, kept, seconds))
    prompt_tokens = sum(r[2] for r in rows)
    cached = sum(r[3] for r in rows)
    later = [r for r in rows if r[4] is not None]
    return {
        "requests": len(rows),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "cached_token_rate": cached / prompt_tokens,
        "recomputed_tokens": prompt_tokens - cached,
        "later_turns": len(later),
        "later_turns_resident": sum(1 for r in later if r[4]),
        "seconds": time.monotonic() - start,
        "per_request": [
            {"session": r[0], "turn": r[1], "prompt": r[2], "cached": r[3], "resident": r[4]}
            for r in rows
        ],
        "_trace": trace,
    }


def _paper(measured: dict, host: dict, device_bytes: int) -> dict:
    """fp16 HiCache of the same host bytes, and the model checked on the KVarN runs."""
    host_bytes, packed = host["host_bytes"], host["host_bytes_per_page"]
    fp16 = host["fp16_bytes_per_page"]
    kvarn_costs = PageCosts(packed, packed * host["host_records_per_sink_page"])
    fp16_costs = PageCosts(fp16, fp16)
    trace = measured["kvarn_hicache"]["_trace"]
    model = {
        "kvarn_hicache": replay(trace, PrefixCacheModel(host_bytes, kvarn_costs, G)),
        "fp16_hicache": replay(trace, PrefixCacheModel(host_bytes, fp16_costs, G)),
        # On the device a sink page is a page plus an fp16 slot (a pool of its own).
        "kvarn_device_only": replay(
            trace, PrefixCacheModel(device_bytes, PageCosts(packed, packed), G)
        ),
    }
    for row in model.values():
        row.pop("per_request_cached")
    moved = host["pages_to_host"] + host["pages_to_device"]
    return {
        "host_bytes": host_bytes,
        "kvarn_bytes_per_page": packed,
        "kvarn_bytes_per_sink_page": kvarn_costs.sink_bytes,
        "fp16_bytes_per_page": fp16,
        "host_tokens_kvarn": host_bytes // packed * G,
        "host_tokens_fp16": host_bytes // fp16 * G,
        "host_token_ratio": fp16 / packed,
        "pages_moved": moved,
        "bytes_moved_kvarn": host["bytes_to_host"] + host["bytes_to_device"],
        "bytes_moved_fp16_same_pages": moved * fp16,
        "model": model,
    }


def format_report(result: dict) -> str:
    m, p = result["measured"], result["paper"]
    lines = [
        "| server | cached-token rate | recomputed tokens | later turns resident | "
        "bytes to host | bytes to device |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in m.items():
        host = row.get("hicache", {})
        lines.append(
            f"| {name} | {row['cached_token_rate']:.1%} | {row['recomputed_tokens']} | "
            f"{row['later_turns_resident']}/{row['later_turns']} | "
            f"{host.get('bytes_to_host', 0) / 2**20:.1f} MiB | "
            f"{host.get('bytes_to_device', 0) / 2**20:.1f} MiB |"
        )
    fp16 = p["model"]["fp16_hicache"]
    lines += [
        "",
        f"host tier: {p['host_bytes'] / 2**20:.1f} MiB = {p['host_tokens_kvarn']} KVarN tokens "
        f"or {p['host_tokens_fp16']} fp16 tokens ({p['host_token_ratio']:.2f}x); a page moves "
        f"{p['kvarn_bytes_per_page']} B (sink page {p['kvarn_bytes_per_sink_page']} B) instead "
        f"of {p['fp16_bytes_per_page']} B",
        f"on paper (page-level LRU model of the same trace): fp16 HiCache cached-token rate "
        f"{fp16['cached_token_rate']:.1%}; the model gives KVarN HiCache "
        f"{p['model']['kvarn_hicache']['cached_token_rate']:.1%} and KVarN without HiCache "
        f"{p['model']['kvarn_device_only']['cached_token_rate']:.1%} (measured above)",
        f"bytes moved: {p['bytes_moved_kvarn'] / 2**20:.1f} MiB for {p['pages_moved']} page "
        f"moves; fp16 pages would take {p['bytes_moved_fp16_same_pages'] / 2**20:.1f} MiB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    servers = {
        name: ServerProcess(SMOLLM2_HF, _server_args(args, hicache), LOGS / f"{name}.log")
        for name, hicache in (("kvarn_hicache", True), ("kvarn", False))
    }
    measured = {}
    # One server at a time: each serves its run alone, and the other's start does not slow it.
    for name, server in servers.items():
        with server.start(timeout=args.start_timeout):
            measured[name] = _serve(server.url, args)
            state = http(f"{server.url}/get_server_info")["internal_states"][0]["kvarn"]
            measured[name]["device_pages"] = state["pages_total"]
            measured[name]["device_pool_bytes"] = state["pool_bytes"]
            if "hicache" in state:
                measured[name]["hicache"] = hicache_state(server.url)
    host = measured["kvarn_hicache"]["hicache"]
    device_bytes = measured["kvarn"]["device_pages"] * host["host_bytes_per_page"]
    result = {"measured": measured, "paper": _paper(measured, host, device_bytes)}
    for row in measured.values():
        row.pop("_trace")
    print(format_report(result))
    header = result_header(argv, "cpu") | {"model": str(SMOLLM2_HF), "args": vars(args)}
    write_result(args.output, header, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
