"""Slot-aware admission: how many fp16 page slots the requests a server has taken on will need.

Between passes a request holds at most ``sink_pages + 1`` slots: its sink pages (shared with
every request whose cached prefix covers them) and the page it is filling. A request that
holds no filling page now opens one at its next page boundary. A request prefilled in chunks
needs one more while a continued chunk runs (``pages.filling_slots``: the chunk starts inside
the page the last one left partial and may end inside a later one). So at any time the slots
*committed* to the requests holding KV (SGLang's live request rows, plus the requests admitted
in this scheduling pass) are

    distinct sink pages of those requests  +  one filling page per request
    +  a second filling page per request prefilled in chunks,

and every other slot is free or held by the sink of a cached prefix that no request uses,
which slot-aware eviction can free (``kvarn_sglang.serving.sink_eviction``). A candidate is
admitted only if ``committed + demand <= slots``, its demand being the sink pages it would add
(new ones, or cached ones no live request holds), its filling page, and a second one if SGLang
may prefill it in chunks. Then every allocation finds its slots, at most after evicting
unlocked cached sinks: prefill never fails for slots, and decode never has to retract for them.
This module is the arithmetic (no SGLang import); the hooks on SGLang's ``PrefillAdder`` are
``kvarn_sglang.patches.schedule_policy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Filling slots of a request prefilled in chunks, the most ``pages.filling_slots`` gives.
CHUNKED_FILLING_SLOTS = 2


@dataclass
class SlotBudget:
    """The slot commitments of one scheduling pass (see the module docstring).

    Attributes:
        num_slots: fp16 slots of the pool.
        live_sinks: page ids of the sink pages held by requests with KV (and admitted ones).
        live_requests: requests holding KV or admitted in this pass (one filling page each).
        new_sinks: sink pages the admitted requests of this pass will allocate.
        chunked: requests among them prefilled in chunks (a second filling page each).
    """

    num_slots: int
    live_sinks: set[int] = field(default_factory=set)
    live_requests: int = 0
    new_sinks: int = 0
    chunked: int = 0

    @property
    def committed(self) -> int:
        extra = (CHUNKED_FILLING_SLOTS - 1) * self.chunked
        return len(self.live_sinks) + self.new_sinks + self.live_requests + extra

    def demand(self, cached_sinks: list[int], new_sinks: int, chunked: bool = False) -> int:
        """Slots a candidate adds: sinks no live request holds, new sinks, its filling page
        (two if it is prefilled in chunks)."""
        filling = CHUNKED_FILLING_SLOTS if chunked else 1
        return len(set(cached_sinks) - self.live_sinks) + new_sinks + filling

    def fits(self, cached_sinks: list[int], new_sinks: int, chunked: bool = False) -> bool:
        return self.committed + self.demand(cached_sinks, new_sinks, chunked) <= self.num_slots

    def admit(self, cached_sinks: list[int], new_sinks: int, chunked: bool = False) -> None:
        self.live_sinks.update(cached_sinks)
        self.new_sinks += new_sinks
        self.live_requests += 1
        self.chunked += int(chunked)
