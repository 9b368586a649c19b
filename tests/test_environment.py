"""The CPU test environment really has what the integration builds on."""

from __future__ import annotations

import importlib
import importlib.metadata


def test_sglang_memory_pool_imports_on_cpu():
    memory_pool = importlib.import_module("sglang.srt.mem_cache.memory_pool")
    assert hasattr(memory_pool, "MHATokenToKVPool")
    assert importlib.metadata.version("sglang") == "0.5.23"


def test_sglang_pieces_the_plugin_hooks_import():
    for module in (
        "sglang.srt.mem_cache.allocator",
        "sglang.srt.mem_cache.radix_cache",
        "sglang.srt.server_args",
        "sglang.srt.plugins",
    ):
        importlib.import_module(module)


def test_package_layout_installs_kernels_and_patches_under_kvarn_sglang():
    importlib.import_module("kvarn_sglang.kernels")
    importlib.import_module("kvarn_sglang.patches")
    scripts = {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert "kvarn-sglang" in scripts


def test_provenance_records_versions_and_commit(tmp_path):
    from kvarn_sglang.eval.provenance import git_commit, versions

    found = versions("torch", "no-such-package-kvarn")
    assert set(found) == {"python", "torch"}
    commit = git_commit()
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)
    assert git_commit(tmp_path) == "unknown"


if __name__ == "__main__":
    test_sglang_memory_pool_imports_on_cpu()
