"""``scripts/gpu_check.sh --dry-run``: the GPU check's steps run on CPU (tests import, tiny
interpreted benchmarks, the graph step eagerly), so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "gpu_check: ok" in done.stdout
    for name in ("decode", "commit", "graph", "prefill"):
        result = json.loads((tmp_path / f"{name}_dry-run.json").read_text())
        assert result["git_commit"]
    assert json.loads((tmp_path / "graph_dry-run.json").read_text())["ok"]


if __name__ == "__main__":
    import tempfile

    test_gpu_check_dry_run(Path(tempfile.mkdtemp()))
