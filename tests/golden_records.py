"""Golden records: what the reference stores for fixed pages, byte for byte, per preset.

For every preset and head_dim, one fixed-seed page of one KV head (``quality_data.hard_pages``:
heavy tails, outlier channels and a token, channel scales over 100x) is quantized by
``quantize_pages``; ``tests/golden/<preset>.json`` keeps every field of the record (codes as
hex rows, fp16 metadata as exact decimals) and the relative dequantization error of K and V.
``tests/test_golden.py`` recomputes them and fails on any difference, so an intended change
of the quantizer shows as a diff of these files in review. Regenerate after one with::

    .venv/bin/python tests/golden_records.py --write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from quality_data import hard_pages

from kvarn_sglang.format.config import PRESETS, get_preset
from kvarn_sglang.quant.reference import dequantize_pages, quantize_pages

GOLDEN = Path(__file__).parent / "golden"
HEAD_DIMS = (64, 128, 256)


def _seed(name: str, d: int) -> int:
    return sorted(PRESETS).index(name) * 1000 + d


def case(name: str, d: int) -> dict:
    """The golden entry of preset ``name`` at head_dim ``d``."""
    cfg = get_preset(name, head_dim=d)
    k, v = (torch.from_numpy(x) for x in hard_pages(1, cfg.page_size, 1, d, seed=_seed(name, d)))
    records = quantize_pages(k, v, cfg)
    kd, vd = dequantize_pages(records, cfg)
    fields = {}
    for name_, t in cfg.layout.unpack(records).items():
        t = t[0, 0]
        if t.dtype == torch.uint8:
            fields[name_] = [bytes(row.tolist()).hex() for row in t]
        else:
            fields[name_] = [float(x) for x in t.tolist()]
    return {
        "head_dim": d,
        "seed": _seed(name, d),
        "page_bytes": cfg.page_bytes,
        "k_rel_error": round(float((kd - k).norm() / k.norm()), 6),
        "v_rel_error": round(float((vd - v).norm() / v.norm()), 6),
        "fields": fields,
    }


def preset_cases(name: str) -> dict:
    return {"preset": name, "cases": [case(name, d) for d in HEAD_DIMS]}


def path_of(name: str) -> Path:
    return GOLDEN / f"{name}.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite tests/golden/*.json")
    parser.add_argument("--presets", default=",".join(sorted(PRESETS)))
    args = parser.parse_args()
    torch.set_num_threads(1)
    changed = 0
    for name in args.presets.split(","):
        text = json.dumps(preset_cases(name), indent=1) + "\n"
        path = path_of(name)
        if path.exists() and path.read_text() == text:
            continue
        changed += 1
        print(f"{'wrote' if args.write else 'differs'}: {path}")
        if args.write:
            GOLDEN.mkdir(exist_ok=True)
            path.write_text(text)
    print(f"{changed} golden file(s) {'rewritten' if args.write else 'out of date'}")
    return 0 if args.write or not changed else 1


if __name__ == "__main__":
    sys.exit(main())
