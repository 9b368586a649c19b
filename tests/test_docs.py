"""The README and docs/ stay true to the tree: the README fits a first read in its order, every
link, image, anchor, repository path, test name and ``python -m benchmarks.*`` module they name
exists, and the plots drawn from committed JSON can be drawn again."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_SECTIONS = (
    "The two commands",
    "GPU quick start",
    "Results at a glance",
    "Support matrix",
    "Links",
)
TOP = "kvarn_sglang|kernels|patches|tests|benchmarks|scripts|requirements|docs"
PATH = re.compile(rf"(?<![\w./-])((?:{TOP})/[\w./<>-]*[\w>])(?:::(\w+))?")
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)\)")
MODULE = re.compile(r"python -m (benchmarks(?:\.\w+)+)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", page.read_text(), re.M)}


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_readme_fits_a_first_read_in_its_order():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert [s for s in sections if s in README_SECTIONS] == list(README_SECTIONS), sections
    for command in ("bash scripts/main.sh", "bash scripts/test.sh"):
        assert command in text


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_images_and_anchors_resolve(page):
    for bang, target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{_rel(page)} links to missing {target}"
        if bang:
            assert resolved.suffix == ".png", f"{_rel(page)}: image {target} is not a PNG"
            assert resolved.is_relative_to(ROOT / "benchmarks" / "results") or (
                resolved.is_relative_to(ROOT / "docs" / "img")
            ), f"{_rel(page)}: image {target} is not in benchmarks/results/ or docs/img/"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{_rel(page)}: no heading for {target}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_paths_tests_and_modules_exist(page):
    text = page.read_text()
    for path, name in PATH.findall(text):
        if any(c in path for c in "<*{"):
            continue  # a placeholder, e.g. benchmarks/results/server_<gpu>.json
        target = ROOT / path
        assert target.exists(), f"{_rel(page)} names missing {path}"
        if name:
            source = target.read_text()
            assert re.search(rf"^\s*(?:def|class) {name}\b", source, re.M), (
                f"{_rel(page)} names {path}::{name}, which is not defined there"
            )
    for module in MODULE.findall(text):
        file = ROOT / (module.replace(".", "/") + ".py")
        assert file.exists(), f"{_rel(page)} runs python -m {module}: no {file.name}"


def test_plots_are_drawn_again_from_committed_json(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import plot_results

    assert plot_results.main(["--out", str(tmp_path)]) == 0
    for name in ("capacity.png", "kernel_static_sm90.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (ROOT / "benchmarks" / "results" / name).exists(), f"{name} is not committed"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
