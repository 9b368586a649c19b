"""Where a result came from: package versions and the git commit, recorded in every JSON."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def versions(*packages: str) -> dict[str, str]:
    """Python's version and those of ``packages`` that are installed."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def git_commit(root: Path = REPO_ROOT) -> str:
    """The commit checked out at ``root``, or ``unknown`` outside a git checkout."""
    try:
        cmd = ["git", "rev-parse", "HEAD"]
        return subprocess.check_output(cmd, cwd=root, text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
