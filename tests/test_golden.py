"""The reference's records for fixed pages equal the committed golden records byte for byte.

``tests/golden/<preset>.json`` (written by ``tests/golden_records.py``) hold, per preset and
head_dim, every field of one page's record and its K and V dequantization error. A change of
the quantizer, intended or not, fails here with the fields and the error that moved; after an
intended one, regenerate with ``.venv/bin/python tests/golden_records.py --write`` and let the
review read the diff. (The CPU reference is deterministic: the records were identical with 1
and 2 torch threads.)
"""

from __future__ import annotations

import json

import pytest
from golden_records import HEAD_DIMS, case, path_of

from kvarn_sglang.format.config import PRESETS

pytestmark = pytest.mark.quality


def _first_difference(got: list, want: list) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a != b:
            return f"first at row {i}: {a!r} != {b!r}"
    return "lengths differ"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_records_equal_the_golden_records(name):
    golden = json.loads(path_of(name).read_text())
    assert [c["head_dim"] for c in golden["cases"]] == list(HEAD_DIMS)
    problems = []
    for want in golden["cases"]:
        got = case(name, want["head_dim"])
        d = want["head_dim"]
        for err in ("k_rel_error", "v_rel_error"):
            if got[err] != want[err]:
                problems.append(f"d={d} {err} {want[err]} -> {got[err]}")
        for field, values in want["fields"].items():
            if got["fields"][field] != values:
                differ = sum(a != b for a, b in zip(got["fields"][field], values, strict=True))
                problems.append(
                    f"d={d} {field}: {differ} of {len(values)} entries differ, "
                    f"{_first_difference(got['fields'][field], values)}"
                )
        if got["page_bytes"] != want["page_bytes"]:
            problems.append(f"d={d} page_bytes {want['page_bytes']} -> {got['page_bytes']}")
    assert not problems, (
        f"{name} no longer produces its golden records (if intended: "
        f".venv/bin/python tests/golden_records.py --write):\n" + "\n".join(problems)
    )


if __name__ == "__main__":
    test_records_equal_the_golden_records("k4v2_g128")
