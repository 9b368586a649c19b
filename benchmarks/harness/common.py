"""Shared benchmark plumbing: timing, device facts and the JSON result header."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvarn_sglang.eval.provenance import git_commit, versions

ROOT = Path(__file__).resolve().parents[2]
# Published HBM bandwidth in GB/s by device-name fragment.
HBM_PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor()})"


def hbm_peak_gbs(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in HBM_PEAK_GBS.items() if k in name), None)


def time_fn(fn: Callable[[], object], args) -> float:
    """Median microseconds of ``fn`` over ``args.iters`` runs after ``args.warmup`` runs."""
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(max(1, args.iters)):
        if args.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return sorted(times)[len(times) // 2]


def result_header(argv: list[str] | None, device: str) -> dict:
    return {
        "command": " ".join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "device": device_name(device),
        "versions": versions("torch", "triton") | {"cuda": str(torch.version.cuda)},
        "git_commit": git_commit(),
    }


def write_result(path: str | None, header: dict, body: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**header, **body}, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
