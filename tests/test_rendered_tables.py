"""The published tables say what the committed results JSON says.

Every ``<!-- table:NAME ARG... -->`` block of README.md and docs/*.md must equal what
``benchmarks/render_tables.py`` renders from its JSON today; a benchmark rerun whose JSON was
committed without re-rendering, or a number typed into a block by hand, fails here (fix:
``.venv/bin/python -m benchmarks.render_tables``).
"""

from __future__ import annotations

import pytest

from benchmarks.render_tables import (
    BLOCK,
    ROOT,
    default_pages,
    main,
    render,
    render_block,
    stale_blocks,
)


@pytest.mark.parametrize("page", default_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_block_matches_its_json(page):
    stale = stale_blocks(page.read_text())
    assert not stale, (
        f"{page.relative_to(ROOT)}: tables {stale} differ from their JSON "
        f"(.venv/bin/python -m benchmarks.render_tables)"
    )


def test_the_docs_render_the_quality_figures():
    # At least the figures pytest -m quality asserts are published through a block.
    specs = [m.group("spec") for p in default_pages() for m in BLOCK.finditer(p.read_text())]
    assert "quality benchmarks/results/quality_smollm2.json" in specs, specs


def test_a_hand_edited_number_is_caught_and_rerendered(tmp_path):
    spec = "quality benchmarks/results/quality_smollm2.json"
    table = render_block(spec)
    edited = table.replace("k4v2_g128 | 0.0", "k4v2_g128 | 9.0", 1)
    assert edited != table
    page = tmp_path / "page.md"
    page.write_text(f"text\n<!-- table:{spec} -->\n{edited}\n<!-- /table -->\nmore\n")
    assert stale_blocks(page.read_text()) == [spec]
    assert main(["--check", str(page)]) == 1
    assert main([str(page)]) == 0
    assert page.read_text() == f"text\n<!-- table:{spec} -->\n{table}\n<!-- /table -->\nmore\n"
    assert main(["--check", str(page)]) == 0
    assert render(page.read_text()) == page.read_text()


def test_an_unknown_table_is_rejected():
    with pytest.raises(ValueError, match="Unknown table 'nope'"):
        render_block("nope benchmarks/results/quality_smollm2.json")


if __name__ == "__main__":
    test_a_hand_edited_number_is_caught_and_rerendered(__import__("pathlib").Path("/tmp"))
