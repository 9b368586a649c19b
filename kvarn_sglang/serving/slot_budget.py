"""Slot-aware admission: how many fp16 page slots the requests a server has taken on will need.

Between passes a request holds at most ``sink_pages + 1`` slots: its sink pages (shared with
every request whose cached prefix covers them) and the page it is filling. A request that
holds no filling page now opens one at its next page boundary. So at any time the slots
*committed* to the requests holding KV (SGLang's live request rows, plus the requests admitted
in this scheduling pass) are

    distinct sink pages of those requests  +  one filling page per request,

and every other slot is free or held by the sink of a cached prefix that no request uses,
which slot-aware eviction can free (``kvarn_sglang.serving.sink_eviction``). A candidate is admitted
only if ``committed + demand <= slots``, its demand being the sink pages it would add (new
ones, or cached ones no live request holds) and its filling page. Then every allocation finds
its slots, at most after evicting unlocked cached sinks: prefill never fails for slots, and
decode never has to retract for them. This module is the arithmetic (no SGLang import); the
hook on SGLang's ``PrefillAdder.add_one_req`` is ``kvarn_sglang.patches.schedule_policy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SlotBudget:
    """The slot commitments of one scheduling pass (see the module docstring).

    Attributes:
        num_slots: fp16 slots of the pool.
        live_sinks: page ids of the sink pages held by requests with KV (and admitted ones).
        live_requests: requests holding KV or admitted in this pass (one filling page each).
        new_sinks: sink pages the admitted requests of this pass will allocate.
    """

    num_slots: int
    live_sinks: set[int] = field(default_factory=set)
    live_requests: int = 0
    new_sinks: int = 0

    @property
    def committed(self) -> int:
        return len(self.live_sinks) + self.new_sinks + self.live_requests

    def demand(self, cached_sinks: list[int], new_sinks: int) -> int:
        """Slots a candidate adds: sinks no live request holds, new sinks, its filling page."""
        return len(set(cached_sinks) - self.live_sinks) + new_sinks + 1

    def fits(self, cached_sinks: list[int], new_sinks: int) -> bool:
        return self.committed + self.demand(cached_sinks, new_sinks) <= self.num_slots

    def admit(self, cached_sinks: list[int], new_sinks: int) -> None:
        self.live_sinks.update(cached_sinks)
        self.new_sinks += new_sinks
        self.live_requests += 1
