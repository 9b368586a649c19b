"""What a compiled kernel costs, read from its PTX and cubin (no GPU needed).

* ``resources``: registers, spill bytes and stack from ``ptxas -v`` run on the kernel's PTX
  with Triton's own ptxas flags, plus Triton's dynamic shared memory;
* ``occupancy``: programs per SM as limited by registers, shared memory and threads;
* ``disassemble``: the SASS from ``nvdisasm -c -gi``, each instruction with its source
  location chain (innermost first), cut into basic blocks at labels and after branches;
* ``loops``: natural loops from back edges (a branch to an earlier label);
* ``path_instructions``: per iteration of the loop that runs one kind of page, how many
  instructions one warp issues (static count of the loop's blocks, every branch of the loop
  body counted, so an upper bound when the body branches).

Source locations are mapped to Python functions with ``ast``, so a block can be attributed to
the ``@triton.jit`` helper its instructions came from (``packed_page_step`` for instance).
"""

from __future__ import annotations

import ast
import linecache
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from benchmarks.harness.static_compile import triton_bin

# Per-SM limits by compute capability: registers, threads, programs, shared memory (bytes);
# each program also reserves 1 KiB of shared memory (sm_80 and later).
SM_LIMITS = {
    80: {"regs": 65536, "threads": 2048, "programs": 32, "shared": 167936},
    90: {"regs": 65536, "threads": 2048, "programs": 32, "shared": 233472},
}
RESERVED_SHARED = 1024
# Opcode groups reported in the instruction mix.
GROUPS = {
    "tensor": ("HMMA", "HGMMA", "IMMA", "QGMMA"),
    "int_to_float": ("I2F", "I2FP"),
    "shared": ("LDS", "STS", "LDSM", "STSM", "LDGSTS", "ATOMS"),
    "local": ("LDL", "STL"),
    "global": ("LDG", "STG", "RED", "ATOMG", "UBLKCP", "UTMALDG"),
    "special": ("MUFU",),
    "shuffle": ("SHFL",),
    "barrier": ("BAR", "WARPSYNC", "SYNCS"),
}


@dataclass
class Instr:
    addr: int
    opcode: str  # full mnemonic, e.g. "LOP3.LUT"
    text: str
    where: tuple[tuple[str, int], ...]  # (file, line), innermost first

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def target(self) -> str | None:
        m = re.search(r"`\((\.L_x_\d+)\)", self.text)
        return m.group(1) if m and self.base in ("BRA", "BRX", "JMP") else None


@dataclass
class Block:
    label: str | None
    instrs: list[Instr] = field(default_factory=list)

    @property
    def start(self) -> int:
        return self.instrs[0].addr


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def resources(kernel, capability: int) -> dict:
    """Registers, spill bytes and stack frame of a compiled Triton kernel, from ptxas -v."""
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        log = _run(
            [triton_bin("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={arch}", str(ptx), "-o", str(Path(tmp) / "k.o")]
        )  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {
        "registers": regs,
        "spill_store_bytes": int(spill.group(1)) if spill else 0,
        "spill_load_bytes": int(spill.group(2)) if spill else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
        "shared_bytes": int(kernel.metadata.shared),
        "num_warps": int(kernel.metadata.num_warps),
        "num_stages": int(kernel.metadata.num_stages),
    }


def occupancy(res: dict, capability: int) -> dict:
    """Programs per SM as limited by registers, shared memory and threads (the minimum)."""
    lim = SM_LIMITS[90 if capability >= 90 else 80]
    warps = res["num_warps"]
    regs_per_warp = -(-res["registers"] * 32 // 256) * 256  # allocated per warp, 256 at a time
    by_regs = lim["regs"] // (regs_per_warp * warps)
    by_shared = lim["shared"] // (res["shared_bytes"] + RESERVED_SHARED)
    by_threads = lim["threads"] // (32 * warps)
    return {
        "programs_per_sm": min(by_regs, by_shared, by_threads, lim["programs"]),
        "by_registers": by_regs,
        "by_shared": by_shared,
        "by_threads": by_threads,
    }


_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(.*)')
_INLINED = re.compile(r'inlined at "([^"]+)", line (\d+)')
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def disassemble(cubin: bytes) -> list[Block]:
    """SASS of a cubin as basic blocks (split at labels and after branches or exits)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = _run([triton_bin("nvdisasm"), "-c", "-gi", f.name])
    blocks = [Block(None)]
    where: tuple[tuple[str, int], ...] = ()
    annotated = False  # a run of annotations: the first holds the whole inlining chain
    for line in text.splitlines():
        s = line.strip()
        m = _LINE.match(s)
        if m:
            if not annotated:
                chain = [(m.group(1), int(m.group(2)))]
                chain += [(f, int(n)) for f, n in _INLINED.findall(m.group(3))]
                where = tuple(chain)
            annotated = True
            continue
        annotated = False
        if re.fullmatch(r"\.L_x_\d+:", s):
            blocks.append(Block(s[:-1]))
            continue
        m = _INSTR.search(s)
        if not m:
            continue
        body = re.sub(r"^@!?U?P\w+\s+", "", m.group(2))
        op = body.split()[0] if body else ""
        ins = Instr(int(m.group(1), 16), op, m.group(2), where)
        if blocks[-1].instrs and blocks[-1].instrs[-1].base in ("BRA", "EXIT", "RET", "BRX"):
            blocks.append(Block(None))
        blocks[-1].instrs.append(ins)
    return [b for b in blocks if b.instrs]


def instructions(blocks: list[Block]) -> list[Instr]:
    return [i for b in blocks for i in b.instrs]


def mix(instrs: list[Instr]) -> dict:
    """Instruction counts: total, per group of ``GROUPS`` and the most frequent opcodes."""
    by_base = Counter(i.base for i in instrs)
    out = {"total": len(instrs)}
    for name, ops in GROUPS.items():
        out[name] = sum(by_base[o] for o in ops)
    out["top"] = dict(by_base.most_common(12))
    return out


def loops(blocks: list[Block]) -> list[tuple[int, int]]:
    """Natural loops as (first block index, last block index), from back edges."""
    index = {b.label: i for i, b in enumerate(blocks) if b.label}
    found = set()
    for i, b in enumerate(blocks):
        for ins in b.instrs:
            t = ins.target
            if t in index and index[t] <= i:
                found.add((index[t], i))
    return sorted(found)


@lru_cache(maxsize=64)
def _functions(path: str) -> tuple[tuple[int, int, str], ...]:
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError):
        return ()
    return tuple(
        (n.lineno, n.end_lineno or n.lineno, n.name)
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef)
    )


def functions_of(ins: Instr) -> set[str]:
    """Names of the Python functions on an instruction's source chain (inlined helpers too)."""
    names = set()
    for path, line in ins.where:
        for lo, hi, name in _functions(path):
            if lo <= line <= hi:
                names.add(name)
    return names


def block_kind(block: Block, markers: dict[str, set[str]]) -> str | None:
    """The kind whose marker functions most of the block's marked instructions came from."""
    votes = Counter()
    for ins in block.instrs:
        for kind, funcs in markers.items():
            if functions_of(ins) & funcs:
                votes[kind] += 1
    if not votes:
        return None
    return votes.most_common(1)[0][0]


def path_instructions(blocks: list[Block], markers: dict[str, set[str]]) -> dict[str, int]:
    """Per kind of ``markers``: the static instruction count of one iteration of the loop
    that runs it (its own blocks plus the loop's unmarked blocks), per warp.

    A loop whose blocks belong to several kinds (an if/else in the page loop) counts, for each
    kind, that kind's blocks and the unmarked ones. Kinds in no loop are absent.
    """
    kinds = [block_kind(b, markers) for b in blocks]
    out: dict[str, int] = {}
    for lo, hi in loops(blocks):
        inner = [(lo2, hi2) for lo2, hi2 in loops(blocks) if lo <= lo2 and hi2 <= hi]
        if len(inner) > 1:
            continue  # an outer loop: its inner loops are counted on their own
        present = {k for k in kinds[lo : hi + 1] if k}
        for kind in present:
            n = sum(len(blocks[i].instrs) for i in range(lo, hi + 1) if kinds[i] in (kind, None))
            out[kind] = max(out.get(kind, 0), n)
    return out


def loop_source(blocks: list[Block], loop: tuple[int, int]) -> str:
    """The Python source line of a loop's back edge (its ``for`` statement)."""
    for ins in reversed(blocks[loop[1]].instrs):
        if ins.target and ins.where:
            path, line = ins.where[0]
            return linecache.getline(path, line).strip()
    return ""


def dynamic_instructions(blocks: list[Block], trips: dict[str, float]) -> float:
    """Instructions one warp issues for one run of the code outside loops, where each loop
    runs as many times as the first ``trips`` entry whose key occurs in its ``for`` line says
    (default 1), every branch of a conditional counted (an upper bound). Blocks before the
    first loop (the prologue) are not counted when ``trips`` names the outermost loop 1."""
    mult = [1.0] * len(blocks)
    for lp in loops(blocks):
        if lp[0] == lp[1] and len(blocks[lp[0]].instrs) == 1:
            continue  # the trap loop after EXIT
        src = loop_source(blocks, lp)
        n = next((v for k, v in trips.items() if k in src), 1.0)
        for i in range(lp[0], lp[1] + 1):
            mult[i] *= n
    return sum(len(b.instrs) * m for b, m in zip(blocks, mult, strict=True))


def loop_body(blocks: list[Block], key: str) -> list[int]:
    """Block indices of the loop whose ``for`` line contains ``key``."""
    for lp in loops(blocks):
        if key in loop_source(blocks, lp):
            return list(range(lp[0], lp[1] + 1))
    return []
