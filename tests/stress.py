"""Randomized stress of SGLang's allocator, radix cache and request pool with the KVarN pool and
attention backend, driven the way SGLang's scheduler drives them (CPU, SGLang's real classes).

``run_stress(seed, steps)`` draws interleaved operations from a seeded RNG: new requests (many
sharing a prefix), chunked and batched prefill, decode steps, aborts mid-prefill and
mid-decode, finishes, prefix matches and evictions, on a pool small enough that eviction,
out-of-memory and retraction happen all the time. Allocation follows the scheduler
(``SimServer``): ``evict_to_free_tokens`` then ``alloc_extend``/``alloc_decode``; before a
decode step
``check_decode_capacity``, and when it says no, the least preferred request is retracted
(its KV freed, the request back in the waiting queue) as ``ScheduleBatch.retract_decode``
does. A prefill that finds no memory waits. After every operation ``check_invariants`` checks:

* every page is free, in the radix tree or owned by exactly one running request;
* every fp16 slot is free or held by exactly one page, and only sink pages and running
  requests' unfinished pages hold one (and they all do);
* every full non-sink page (in the tree or running) was quantized exactly once;
* the tree's sizes add up and running requests' prefixes are tree pages.

Every attention output is compared with every other computation of the same token prefix
(a cache hit, a miss, a recompute after retraction: all must agree) and, for finishing requests
whose id is a multiple of ``dense_every``, with the dense spec. At the end everything finishes
and the pool, slots and rows must be back to their initial state. A failure is shrunk by delta
debugging to a minimal operation sequence and reported with the code that replays it.
"""

from __future__ import annotations

import random
import time
import traceback
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang_harness import SimRequest, SimServer

from benchmarks.harness.fidelity import one_thread
from kvarn_sglang.format.config import KVarNConfig

G = 64
CFG = KVarNConfig(k_bits=4, v_bits=2, page_size=G, head_dim=64, sink_pages=1)
VOCAB = 64
MAX_TOKENS = 12 * G  # SimServer rows hold 16 pages; leave room to decode
HIT_TOL = 1e-5  # the same prefix computed twice (hit, miss, recompute)
MEMO_SIZE = 20_000  # token prefixes whose outputs are remembered
DENSE_TOL = 2e-3  # against the dense spec (fp16 K/V, reference attention)


class StressFailure(AssertionError):
    """An invariant broke; ``ops`` is the minimal failing sequence found."""

    def __init__(self, message: str, ops: list[tuple]) -> None:
        super().__init__(message)
        self.ops = ops


@dataclass
class Request:
    rid: int
    tokens: list[int]  # prompt, then generated tokens; shared with ``sim.tokens``
    prompt_len: int
    sim: SimRequest | None = None  # None while waiting


class StressDriver:
    """Applies operations to a ``SimServer``; ops naming unknown requests are no-ops, so any
    subsequence of a log is a valid log (needed for shrinking)."""

    def __init__(self, *, num_pages=10, num_slots=None, max_running=4, dense_every=4, layers=2):
        # Default slots: (sink + 1) per running request plus one. This harness admits by
        # pages only (the server's slot-aware admission is a PrefillAdder hook, tested in
        # tests/test_slot_admission.py), so with this many slots running requests never run
        # short while cached sink pages compete with them; with fewer, requests wait for
        # slots at allocation and decode retracts (the "slots short" regime).
        num_slots = num_slots or max_running * (CFG.sink_pages + 1) + 1
        self.server = SimServer(CFG, num_pages=num_pages, num_slots=num_slots, layers=layers)
        self._count_slot_evictions()
        self.max_running, self.dense_every = max_running, dense_every
        self.reqs: dict[int, Request] = {}
        # (length, hash) of a token prefix -> outputs of its last position [layers, Hq, D];
        # the oldest entries go first beyond MEMO_SIZE, which bounds memory on long runs.
        self.memo: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self.stats: Counter = Counter()

    def _count_slot_evictions(self) -> None:
        """Count the tokens the allocator evicts from the tree to free fp16 slots."""
        alloc, tree = self.server.alloc, self.server.tree
        make_slot_room = alloc.make_slot_room

        def counted(tree_cache, num_slots: int) -> bool:
            before = tree.total_size()
            ok = make_slot_room(tree_cache, num_slots)
            self.stats["slot_evicted_tokens"] += before - tree.total_size()
            return ok

        alloc.make_slot_room = counted

    # ----------------------------------------------------------------- views
    def running(self) -> list[Request]:
        return [r for r in self.reqs.values() if r.sim is not None]

    def waiting(self) -> list[Request]:
        return [r for r in self.reqs.values() if r.sim is None]

    def decodable(self) -> list[Request]:
        return [
            r
            for r in self.running()
            if r.sim.kv_len == len(r.tokens) and len(r.tokens) < MAX_TOKENS + G
        ]

    # ----------------------------------------------------------------- ops
    def apply(self, op: tuple) -> None:
        getattr(self, f"_op_{op[0]}")(*op[1:])
        self.stats[op[0]] += 1

    def _op_new(self, rid: int, tokens: tuple[int, ...]) -> None:
        if rid not in self.reqs:
            self.reqs[rid] = Request(rid, list(tokens), len(tokens))

    def _op_prefill(self, rids: tuple[int, ...], chunk: int) -> None:
        batch, fresh = [], []
        for rid in dict.fromkeys(rids):
            r = self.reqs.get(rid)
            if r is None:
                continue
            if r.sim is None:
                if len(self.running()) >= self.max_running:
                    continue
                r.sim = self.server.start(r.tokens)
                if r.sim is None:  # no request row free
                    continue
                fresh.append(r)
                self.stats["admitted"] += 1
                self.stats["prefix_hit_tokens"] += r.sim.cached_len
            if r.sim.kv_len < len(r.tokens):
                batch.append(r)
        if not batch:
            return
        pre = [r.sim.kv_len for r in batch]
        counts = [min(chunk, len(r.tokens) - r.sim.kv_len) for r in batch]
        if not self.server.extend([r.sim for r in batch], counts):
            pages = sum(-(-(p + c) // G) - -(-p // G) for p, c in zip(pre, counts, strict=True))
            short = "pages" if self.server.alloc.available_size() < pages * G else "slots"
            self.stats[f"prefill_waits_for_{short}"] += 1
            for r in fresh:  # back to the waiting queue, as if never scheduled
                self.server.abort(r.sim)
                r.sim = None
            return
        for r, p in zip(batch, pre, strict=True):
            self._compare(r, p)

    def _need(self, batch: list[Request]) -> int:
        """``ScheduleBatch.new_tokens_required_next_decode``: a page per request whose next
        token starts one."""
        return sum(1 for r in batch if r.sim.kv_len % G == 0) * G

    def _op_decode(self, rids: tuple[int, ...], tokens: tuple[int, ...]) -> None:
        ready = {r.rid for r in self.decodable()}
        batch = [self.reqs[rid] for rid in dict.fromkeys(rids) if rid in ready]
        if not batch:
            return
        next_token = dict(zip(rids, tokens, strict=True))
        # retract_decode: keep the requests with the most output, retract from the end.
        batch.sort(key=lambda r: (len(r.tokens) - r.prompt_len, -r.prompt_len), reverse=True)
        alloc, tree = self.server.alloc, self.server.tree
        if not alloc.check_decode_capacity(num_tokens=self._need(batch), tree_cache=tree):
            short = "pages" if alloc.available_size() < self._need(batch) else "slots"
            self.stats[f"decode_short_of_{short}"] += 1
            first = True
            while first or not alloc.check_decode_capacity(
                num_tokens=self._need(batch), tree_cache=tree
            ):
                if len(batch) == 1:
                    break
                first = False
                self._retract(batch.pop())
            if not alloc.check_decode_capacity(num_tokens=self._need(batch), tree_cache=tree):
                self._drop(batch.pop())  # even the last one cannot fit: SGLang aborts it
                self.stats["aborted_out_of_memory"] += 1
                return
        for r in batch:
            r.tokens.append(next_token[r.rid])
        if not self.server.decode([r.sim for r in batch]):
            raise AssertionError("alloc_decode failed after check_decode_capacity said it fits")
        for r in batch:
            self._compare(r, len(r.tokens) - 1)

    def _retract(self, r: Request) -> None:
        self.server.abort(r.sim)  # free without inserting: SGLang needs the space now
        r.sim = None
        self.stats["retracted"] += 1

    def _drop(self, r: Request) -> None:
        if r.sim is not None:
            self.server.abort(r.sim)
        del self.reqs[r.rid]

    def _op_finish(self, rid: int) -> None:
        r = self.reqs.get(rid)
        if r is None or r.sim is None or r.sim.kv_len < len(r.tokens):
            return  # only a fully computed running request finishes
        self.stats["finished_total"] += 1
        if rid % self.dense_every == 0:  # by id, not by count: shrinking keeps the choice
            self._check_dense(r)
        self.server.finish(r.sim)
        del self.reqs[rid]

    def _op_abort(self, rid: int) -> None:
        r = self.reqs.get(rid)
        if r is not None:
            phase = (
                "waiting"
                if r.sim is None
                else "prefill"
                if r.sim.kv_len < len(r.tokens)
                else "decode"
            )
            self.stats[f"aborted_in_{phase}"] += 1
            self._drop(r)

    def _op_match(self, tokens: tuple[int, ...]) -> None:
        tree = self.server.tree
        m = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
        n = m.device_prefix_len
        assert n % G == 0 and n <= len(tokens), f"match of {len(tokens)} tokens gave {n}"
        idx = tree.path_device_indices(m.last_device_node)[:n].long()
        pages = idx.view(-1, G) if n else idx.view(0, G)
        assert torch.equal(pages, pages[:, :1] + torch.arange(G)), "matched slots not page-aligned"
        self.stats["matched_tokens"] += n

    def _op_evict(self, num_tokens: int) -> None:
        self.server.tree.evict(EvictParams(num_tokens=num_tokens))

    # ----------------------------------------------------------------- outputs
    def _compare(self, r: Request, start: int) -> None:
        """Outputs of positions ``start..kv_len-1`` against earlier computations of the same
        token prefix (whether it came from the cache, was computed cold, or recomputed)."""
        for pos in range(start, r.sim.kv_len):
            key = (pos + 1, hash(tuple(r.tokens[: pos + 1])))
            outs = torch.stack(r.sim.outputs[pos])
            seen = self.memo.get(key)
            if seen is None:
                self.memo[key] = outs
                if len(self.memo) > MEMO_SIZE:
                    self.memo.popitem(last=False)
                continue
            self.memo.move_to_end(key)
            self.stats["outputs_compared"] += 1
            if not torch.allclose(outs, seen, atol=HIT_TOL, rtol=HIT_TOL):
                err = float((outs - seen).abs().max())
                raise AssertionError(
                    f"request {r.rid} position {pos}: output differs by {err:.3g} from an "
                    f"earlier computation of the same prefix"
                )

    def _check_dense(self, r: Request) -> None:
        self.stats["dense_checks"] += 1
        for layer in range(len(self.server.layers)):
            want = self.server.expected(r.tokens[: r.sim.kv_len], layer)
            for pos, outs in r.sim.outputs.items():
                if not torch.allclose(outs[layer], want[pos], atol=DENSE_TOL, rtol=DENSE_TOL):
                    raise AssertionError(
                        f"request {r.rid} position {pos} layer {layer}: output differs from "
                        f"the dense spec by {float((outs[layer] - want[pos]).abs().max()):.3g}"
                    )

    # ----------------------------------------------------------------- end
    def drain(self) -> None:
        """Finish every computed request, abort the rest, then evict the whole tree."""
        for r in list(self.reqs.values()):
            if r.sim is not None and r.sim.kv_len == len(r.tokens) and r.sim.kv_len:
                self.server.finish(r.sim)
                del self.reqs[r.rid]
            else:
                self._drop(r)
        self.server.tree.evict(EvictParams(num_tokens=10**9))

    def check_final(self) -> None:
        s = self.server
        store = s.pool.store
        assert s.tree.total_size() == 0, f"{s.tree.total_size()} tokens left in the tree"
        assert s.alloc.available_size() == s.alloc.num_pages * G, "pages leaked"
        assert store.free_slots == store.num_slots, "fp16 slots leaked"
        assert not store.held_mask().any() and not store.commits.any(), "page state leaked"
        assert s.req_pool.available_size() == s.req_pool.size, "request rows leaked"


def _tree_pages(tree) -> dict[int, int]:
    """Every page in the tree -> its index within its sequence; checks page alignment."""
    pages: dict[int, int] = {}
    stack = [(tree.root_node, 0)]
    while stack:
        node, depth = stack.pop()
        for child in node.children.values():
            vals = child.value.long()
            assert len(vals) % G == 0, "tree node not page-aligned"
            blocks = vals.view(-1, G)
            assert torch.equal(blocks, blocks[:, :1] + torch.arange(G)), "tree page split"
            for i, page in enumerate((blocks[:, 0] // G).tolist()):
                assert page not in pages, f"page {page} twice in the tree"
                pages[page] = depth // G + i
            stack.append((child, depth + len(vals)))
    return pages


def check_invariants(d: StressDriver) -> None:
    """The invariants of the module docstring, on the driver's current state."""
    s, sink = d.server, CFG.sink_pages
    store, alloc, tree = s.pool.store, s.alloc, s.tree
    in_tree = _tree_pages(tree)
    free = alloc.get_all_free_pages().tolist()
    assert len(free) * G == alloc.available_size(), "free list and available size disagree"
    owner: dict[int, int] = {}
    must_slot, committed, uncommitted = set(), set(), set()
    for page, index in in_tree.items():
        (uncommitted if index < sink else committed).add(page)
        if index < sink:
            must_slot.add(page)
    for r in d.running():
        row = s.req_pool.req_to_token[r.sim.row, : r.sim.kv_len].long()
        table = (row[::G] // G).tolist()
        prefix = r.sim.cached_len // G
        assert all(p in in_tree for p in table[:prefix]), f"request {r.rid} prefix not in tree"
        for j, page in enumerate(table[prefix:], start=prefix):
            assert page not in owner and page not in in_tree, f"page {page} shared by requests"
            owner[page] = r.rid
            full = (j + 1) * G <= r.sim.kv_len
            (committed if full and j >= sink else uncommitted).add(page)
            if j < sink or not full:
                must_slot.add(page)
    every = free + list(in_tree) + list(owner)
    assert sorted(every) == list(range(1, alloc.num_pages + 1)), "page leaked or double-owned"
    holders = store.held_mask().nonzero().flatten().tolist()  # applies pending releases
    slots = store.page_slot[holders].tolist()
    free_slots = store._stack[: store._top].tolist()
    assert len(set(slots)) == len(slots), "one fp16 slot held by two pages"
    assert len(set(free_slots)) == len(free_slots) == store.free_slots, "fp16 free stack"
    assert len(slots) + len(free_slots) == store.num_slots, "fp16 slot leaked"
    assert not set(free_slots) & set(slots), "a held fp16 slot is also free"
    assert set(holders) == must_slot, (
        f"slots held by {sorted(set(holders) - must_slot)}, missing for "
        f"{sorted(must_slot - set(holders))}"
    )
    commits = store.commits
    bad = [p for p in committed if commits[p] != 1] + [p for p in uncommitted if commits[p] != 0]
    assert not bad, f"pages quantized {[int(commits[p]) for p in bad]} times: {bad}"
    assert not commits[free].any(), "a free page keeps a commit count"
    assert tree.evictable_size() + tree.protected_size() == tree.total_size(), "tree sizes"
    assert s.req_pool.available_size() == s.req_pool.size - len(d.running()), "request rows"


# --------------------------------------------------------------------- generation
def _draw_op(rng: random.Random, d: StressDriver, next_rid: int, prefixes) -> tuple:
    """One operation fitting the driver's state (a scheduler's or a client's next move)."""
    roll = rng.random()
    running, waiting, ready = d.running(), d.waiting(), d.decodable()
    prefilling = [r for r in running if r.sim.kv_len < len(r.tokens)]
    if (roll < 0.12 and len(waiting) < 6) or not d.reqs:
        shared = rng.choice(prefixes)
        cut = rng.choice([len(shared), rng.randrange(1, len(shared) + 1)])
        base = shared[:cut] if rng.random() < 0.7 else []
        n = len(base) + rng.randrange(1, G + 8)
        if rng.random() < 0.4:  # end just before a page boundary: decode steps cross it
            n = max(len(base) + 1, -(-n // G) * G - rng.randrange(0, 3))
        tokens = base + [rng.randrange(VOCAB) for _ in range(n - len(base))]
        return ("new", next_rid, tuple(tokens[:MAX_TOKENS]))
    if roll < 0.42 and (waiting or prefilling):
        pool = [r.rid for r in waiting + prefilling]
        rids = tuple(rng.sample(pool, min(len(pool), rng.randrange(1, 4))))
        chunk = rng.choice([1, G - 1, G, G + 1, 2 * G + 3, rng.randrange(1, 3 * G)])
        return ("prefill", rids, chunk)
    if roll < 0.75 and ready:
        rids = tuple(r.rid for r in ready if rng.random() < 0.8) or (ready[0].rid,)
        return ("decode", rids, tuple(rng.randrange(VOCAB) for _ in rids))
    if roll < 0.83 and ready:
        return ("finish", rng.choice(ready).rid)
    if roll < 0.88 and d.reqs:
        return ("abort", rng.choice(list(d.reqs)))
    if roll < 0.95:
        p = rng.choice(prefixes)
        return ("match", tuple(p[: rng.randrange(1, len(p) + 1)]))
    return ("evict", rng.randrange(1, 5) * G)


def replay(ops: list[tuple], driver_cls=None, **driver_kwargs) -> StressDriver:
    """Apply ``ops`` to a fresh driver, checking after every step and at the end."""
    with one_thread():
        d = (driver_cls or StressDriver)(**driver_kwargs)
        for op in ops:
            d.apply(op)
            check_invariants(d)
        d.drain()
        d.check_final()
    return d


def shrink(ops: list[tuple], fails, budget_s: float = 120.0) -> list[tuple]:
    """Delta debugging (ddmin): a smaller list of ops for which ``fails`` still holds."""
    deadline, n = time.monotonic() + budget_s, 2
    while len(ops) >= 2 and time.monotonic() < deadline:
        size = -(-len(ops) // n)
        for i in range(0, len(ops), size):
            candidate = ops[:i] + ops[i + size :]
            if fails(candidate):
                ops, n = candidate, max(n - 1, 2)
                break
        else:
            if n >= len(ops):
                break
            n = min(len(ops), 2 * n)
    return ops


def format_ops(ops: list[tuple]) -> str:
    return "OPS = [\n" + "".join(f"    {op!r},\n" for op in ops) + "]"


def run_stress(seed: int, steps: int, *, shrink_budget_s: float = 120.0, driver_cls=None, **kw):
    """Run ``steps`` random operations from ``seed``; returns the driver's stats (op counts,
    invariant checks). Raises ``StressFailure`` with a minimal replayable sequence."""
    cls = driver_cls or StressDriver
    rng = random.Random(seed)
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randrange(G, 3 * G))] for _ in range(3)]
    d, ops = cls(**kw), []
    try:
        with one_thread():
            for _ in range(steps):
                op = _draw_op(rng, d, len(ops), prefixes)
                ops.append(op)
                d.apply(op)
                check_invariants(d)
                d.stats["invariant_checks"] += 1
            d.drain()
            d.check_final()
    except Exception as error:
        kind = type(error)

        def fails(candidate: list[tuple]) -> bool:
            try:
                replay(candidate, cls, **kw)
            except kind:
                return True
            except Exception:
                return False
            return False

        minimal = shrink(ops, fails, shrink_budget_s)
        try:
            replay(minimal, cls, **kw)
            again = "(passed on its own)"
        except Exception as shrunk:
            again = _describe(shrunk)
        raise StressFailure(
            f"stress seed {seed} failed at step {len(ops)}: {_describe(error)}\n"
            f"minimal failing sequence ({len(minimal)} of {len(ops)} ops), which fails with "
            f"{again}; replay it with tests/ on sys.path: from stress import replay; "
            f"replay(OPS, **{kw!r})\n{format_ops(minimal)}",
            minimal,
        ) from error
    return dict(d.stats) | {"steps": steps}


def _describe(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(error)).strip()
