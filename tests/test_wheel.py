"""The README's install works as written: a wheel built from the checkout, installed (not
editable) into a fresh environment, is a complete plugin.

The wheel is built from a copy of the files ``pyproject.toml`` packages (nothing is written
into the checkout) and installed with ``--no-deps`` into a new venv whose site-packages reads
the test environment's packages through a ``.pth`` file (torch, triton, sglang: no network).
From a temporary directory, so that the source tree is not importable, that venv must:

* find ``kvarn`` with SGLang's own plugin loader (group ``sglang.srt.plugins``), pointing at
  ``kvarn_sglang.patches.plugin:register`` from the wheel's distribution, and load it;
* import ``kvarn_sglang``, ``kvarn_sglang.kernels`` and ``kvarn_sglang.patches`` from the
  wheel (the ``package-dir`` mapping of ``kernels/`` and ``patches/``);
* read the eval data files (``kvarn_sglang/eval/data/*.txt``) through the package;
* run the ``kvarn-sglang presets`` console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "kvarn_sglang", "kernels", "patches")

CHECK = r"""
import importlib.resources, json, sys
import kvarn_sglang, kvarn_sglang.kernels, kvarn_sglang.patches
from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group
plugins = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
register, dist = plugins["kvarn"]
data = importlib.resources.files("kvarn_sglang.eval") / "data"
print(json.dumps({
    "package": kvarn_sglang.__file__,
    "kernels": kvarn_sglang.kernels.__file__,
    "patches": kvarn_sglang.patches.__file__,
    "plugin": f"{register.__module__}:{register.__qualname__}",
    "plugin_file": sys.modules[register.__module__].__file__,
    "dist": dist,
    "data": sorted(p.name for p in data.iterdir() if p.name.endswith(".txt")),
    "prompts": len((data / "prompts.txt").read_text().strip().splitlines()),
}))
"""


def _site_packages() -> list[str]:
    """The test environment's site-packages directories (its own and those it chains to)."""
    purelib = sysconfig.get_paths()["purelib"]
    chained = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    return list(dict.fromkeys([purelib, *chained]))


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(the built wheel, the fresh venv's python, a working directory outside the checkout)"""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
        check=True, cwd=tmp, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp / "dist").glob("kvarn_sglang-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        check=True, cwd=tmp, timeout=300,
    )  # fmt: skip
    # After the wheel's own files: the test environment's packages (torch, triton, sglang).
    (site / "zz_test_env.pth").write_text("\n".join(_site_packages()) + "\n")
    work = tmp / "elsewhere"
    work.mkdir()
    return wheel, python, site, work


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TRITON_INTERPRET"] = "1"  # kernels import without a GPU
    return env


def test_the_wheel_holds_the_package_and_its_data_only(wheel_env):
    wheel, *_ = wheel_env
    names = zipfile.ZipFile(wheel).namelist()
    name, version = wheel.name.split("-")[:2]
    tops = {n.split("/")[0] for n in names}
    assert tops == {"kvarn_sglang", f"{name}-{version}.dist-info"}, tops
    for required in (
        "kvarn_sglang/kernels/__init__.py",
        "kvarn_sglang/patches/plugin.py",
        "kvarn_sglang/eval/data/prompts.txt",
        "kvarn_sglang/eval/data/default_text.txt",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[sglang.srt.plugins]\nkvarn = kvarn_sglang.patches.plugin:register" in text, text
    # The README's install: `pip install "dist/kvarn_sglang-...whl[sglang]"` pulls SGLang 0.5.23.
    metadata = zipfile.ZipFile(wheel).read(f"{name}-{version}.dist-info/METADATA").decode()
    assert 'Requires-Dist: sglang==0.5.23; extra == "sglang"' in metadata, metadata
    assert f'pip install "dist/{wheel.name}[sglang]"' in (ROOT / "README.md").read_text()


def test_sglang_finds_the_installed_plugin_outside_the_checkout(wheel_env):
    _, python, site, work = wheel_env
    done = subprocess.run(
        [python, "-c", CHECK], cwd=work, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("package", "kernels", "patches", "plugin_file"):
        assert Path(found[key]).is_relative_to(site), f"{key} imported from {found[key]}"
    assert found["plugin"] == "kvarn_sglang.patches.plugin:register"
    assert found["dist"] == "kvarn-sglang"
    assert found["data"] == ["default_text.txt", "prompts.txt"]
    assert found["prompts"] >= 4


def test_the_console_script_runs_from_the_wheel(wheel_env):
    _, python, _, work = wheel_env
    script = python.parent / "kvarn-sglang"
    done = subprocess.run(
        [script, "presets"], cwd=work, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "k4v2_g128" in done.stdout and "k2v2_g128_plus" in done.stdout, done.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
