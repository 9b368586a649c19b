"""Seeded synthetic workloads with shared prefixes, for the prefix-sharing benchmark.

A workload is a forest of request specs. A spec's prompt is its parent's prompt, plus the
parent's generated tokens, plus the spec's own ``segment`` (a tool output, a user message, a
question); it then generates ``gen_len`` tokens (0: prefill only). A spec becomes ready when
its parent finishes (tools answer instantly: a closed loop). Roots are ready at time 0.
Token ids are synthetic: every segment and every generation draws fresh ids uniformly from
``[1, VOCAB)``, so two sequences share exactly the prefixes the workload gives them.

Lengths (integers; U = uniform, logU = log-uniform, both inclusive):

``agentic`` (default): 4 agents, each with a system prompt + tool definitions of U(1024, 8192)
tokens. Each task picks an agent, adds a task message of U(100, 500) tokens and runs a chain
of U(3, 8) turns; a turn generates U(32, 96) tokens (the tool call) and the next turn's prompt
adds a tool output of logU(200, 4096) tokens. At a branch turn t ~ U(1, turns - 1) the task
forks, chosen with probabilities 0.5 / 0.25 / 0.25:

* ``sample`` (parallel sampling, best-of-n): b in {2, 4, 8, 16} (weights 4, 3, 2, 1) branches
  that all run to the last turn;
* ``search`` (tree search): b1 in {2, 4} branches, each forking again into b2 in {2, 4} at
  the next turn (b1 * b2 <= 16 leaves);
* ``retry``: b in {2, 4, 8} attempts; only the first continues, the others stop after their
  tool call.

A fork is sent the way SGLang's tokenizer manager sends ``n > 1``: one prefill-only request of
the shared prompt, then the b samples once it finished (so the samples hit its pages).

``chat``: 8 few-shot prefixes of U(512, 3072) tokens; each conversation picks one and runs
U(1, 6) turns of a user message U(20, 300) and an answer U(32, 128).

``docqa``: a shared 256-token system prompt; documents of U(4096, 16384) tokens, each ingested
by one prefill-only request and then asked U(2, 8) independent questions of U(20, 100) tokens
with answers of U(32, 128).

``warmup`` specs (the agents' system prompts, the few-shot prefixes, the docqa system prompt)
are served before the measured run: a long-running server has them cached.
"""

from __future__ import annotations

import math
import random
from array import array
from dataclasses import dataclass, field

VOCAB = 128_000
WORKLOADS = ("agentic", "chat", "docqa")


@dataclass(eq=False)
class Spec:
    """One request: prompt = parent prompt + parent output + ``segment``; then ``gen_len``
    generated tokens (``output``, fixed in advance so children can extend them)."""

    sid: int
    parent: Spec | None
    segment: array
    output: array
    task: int
    children: list[Spec] = field(default_factory=list)

    @property
    def gen_len(self) -> int:
        return len(self.output)

    def prompt(self) -> array:
        """The full prompt token ids (``array('q')``)."""
        parts, node = [self.segment], self.parent
        while node is not None:
            parts += [node.output, node.segment]
            node = node.parent
        out = array("q")
        for part in reversed(parts):
            out.extend(part)
        return out


@dataclass
class Workload:
    name: str
    seed: int
    warmup: list[Spec]
    roots: list[Spec]

    def specs(self) -> list[Spec]:
        out, stack = [], list(reversed(self.roots))
        while stack:
            s = stack.pop()
            out.append(s)
            stack.extend(reversed(s.children))
        return out


class _Gen:
    def __init__(self, seed: int, vocab: int = VOCAB, scale: float = 1.0) -> None:
        self.rng = random.Random(seed)
        self.next_sid = 0
        self.vocab, self.scale = vocab, scale

    def ids(self, n: int) -> array:
        """``n`` fresh token ids, cut to ``n * scale`` (at least 1) and folded into
        ``[1, vocab)``; the random stream, and so the workload's shape, is the same at
        every scale and vocabulary."""
        drawn = [self.rng.randrange(1, VOCAB) for _ in range(n)]
        if self.scale != 1.0 and n:
            drawn = drawn[: max(1, round(n * self.scale))]
        if self.vocab != VOCAB:
            drawn = [(t - 1) % (self.vocab - 1) + 1 for t in drawn]
        return array("q", drawn)

    def u(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def logu(self, lo: int, hi: int) -> int:
        return round(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))

    def spec(self, parent: Spec | None, seg_len: int, gen_len: int, task: int) -> Spec:
        s = Spec(self.next_sid, parent, self.ids(seg_len), self.ids(gen_len), task)
        self.next_sid += 1
        if parent is not None:
            parent.children.append(s)
        return s


def _agentic(g: _Gen, tasks: int) -> tuple[list[Spec], list[Spec]]:
    agents = [g.spec(None, g.u(1024, 8192), 0, -1) for _ in range(4)]
    roots = []
    for task in range(tasks):
        agent = g.rng.choice(agents)
        turns = g.u(3, 8)
        branch_at = g.u(1, turns - 1)
        kind = g.rng.choices(("sample", "search", "retry"), (2, 1, 1))[0]
        # The first turn's prompt: system prompt + tools (cached), then the task message.
        head = g.spec(None, 0, 0, task)
        head.segment = array("q", agent.segment) + g.ids(g.u(100, 500))
        head.output = g.ids(g.u(32, 96))
        roots.append(head)
        frontier = [head]
        for turn in range(1, turns):
            nxt = []
            for leaf in frontier:
                fork = 1
                if turn == branch_at:
                    fork = {
                        "sample": g.rng.choices((2, 4, 8, 16), (4, 3, 2, 1))[0],
                        "search": g.rng.choice((2, 4)),
                        "retry": g.rng.choice((2, 4, 8)),
                    }[kind]
                elif turn == branch_at + 1 and kind == "search":
                    fork = g.rng.choice((2, 4))
                tool = g.logu(200, 4096)
                if fork == 1:
                    nxt.append(g.spec(leaf, tool, g.u(32, 96), task))
                    continue
                shared = g.spec(leaf, tool, 0, task)  # the prefill-only request of n > 1
                samples = [g.spec(shared, 0, g.u(32, 96), task) for _ in range(fork)]
                nxt += samples[:1] if kind == "retry" else samples
            frontier = nxt
    return agents, roots


def _chat(g: _Gen, tasks: int) -> tuple[list[Spec], list[Spec]]:
    prefixes = [g.spec(None, g.u(512, 3072), 0, -1) for _ in range(8)]
    roots = []
    for task in range(tasks):
        prefix = g.rng.choice(prefixes)
        node = g.spec(None, 0, g.u(32, 128), task)
        node.segment = array("q", prefix.segment) + g.ids(g.u(20, 300))
        roots.append(node)
        for _ in range(g.u(1, 6) - 1):
            node = g.spec(node, g.u(20, 300), g.u(32, 128), task)
    return prefixes, roots


def _docqa(g: _Gen, tasks: int) -> tuple[list[Spec], list[Spec]]:
    system = g.spec(None, 256, 0, -1)
    roots = []
    for task in range(tasks):
        doc = g.spec(None, 0, 0, task)
        doc.segment = array("q", system.segment) + g.ids(g.u(4096, 16384))
        roots.append(doc)
        for _ in range(g.u(2, 8)):
            g.spec(doc, g.u(20, 100), g.u(32, 128), task)
    return [system], roots


def make_workload(
    name: str, tasks: int, seed: int = 0, *, vocab: int = VOCAB, scale: float = 1.0
) -> Workload:
    """The workload ``name`` (one of ``WORKLOADS``) with ``tasks`` tasks / conversations /
    documents, drawn from ``seed``; token ids in ``[1, vocab)`` and every length scaled by
    ``scale`` (a real model's vocabulary; a CPU-sized run), the shape unchanged."""
    builders = {"agentic": _agentic, "chat": _chat, "docqa": _docqa}
    if name not in builders:
        raise ValueError(f"Unknown workload {name!r}: expected one of {WORKLOADS}")
    if tasks < 1:
        raise ValueError(f"Invalid tasks {tasks}: expected >= 1")
    if not 0.0 < scale <= 1.0 or vocab < 2:
        raise ValueError(f"Invalid scale {scale} or vocab {vocab}: expected (0, 1] and >= 2")
    warmup, roots = builders[name](_Gen(seed, vocab, scale), tasks)
    return Workload(name, seed, warmup, roots)


def describe(w: Workload) -> dict:
    """Counts of a workload: requests, branches (generating leaves), prompt tokens."""
    specs = w.specs()
    prompt = sum(len(s.prompt()) for s in specs)
    return {
        "workload": w.name,
        "seed": w.seed,
        "tasks": len(w.roots),
        "requests": len(specs),
        "prefill_only_requests": sum(s.gen_len == 0 for s in specs),
        "generated_tokens": sum(s.gen_len for s in specs),
        "prompt_tokens": prompt,
        "max_sequence": max(len(s.prompt()) + s.gen_len for s in specs + w.warmup),
    }
