"""Eviction by sink: free an fp16 slot by evicting one cached prefix subtree, in one step.

A cached prefix holds an fp16 slot only for its sink pages (the first ``sink_pages`` pages of
a sequence; every other tree page is packed). Evicting radix-tree leaves one at a time in LRU
order, as SGLang does for pages, frees a slot only once a whole subtree under a distinct sink
is gone, and meanwhile drops leaves of unrelated prefixes, many of them under sinks that
running requests hold. So when slots are short, the allocator evicts by sink instead: it picks
the sink page of the least recently used subtree that no request locks (``evictable_sinks``)
and evicts exactly that subtree (``evict_sink_subtree``). Locks propagate to ancestors in
both of SGLang's trees, so an unlocked sink node has an unlocked subtree.

Both of SGLang 0.5.23's trees are supported (``sglang.srt.mem_cache``):

* ``RadixCache``: nodes are Python objects (``root_node.children``, ``lock_ref``); the subtree
  is evicted by ``RadixCache.evict`` with an eviction strategy that ranks the subtree's nodes
  first, for exactly the subtree's size, so SGLang's own eviction frees the pages.
* ``UnifiedRadixCache`` (the scheduler's default, whose tree core is native Rust or Python):
  only the tree-core interface is used: ``walk_for_kv_canary`` (which tokens are cached
  unlocked, at which depth), the device-eviction walk that yields evictable leaves in LRU
  order (``_evict_device_next_node``; the leaves of other subtrees are skipped, not evicted:
  it also ranks the subtrees by their most recently used leaf),
  ``collect_path_info`` and ``get_component_device_value`` (which node of a leaf's path holds
  the sink), and ``_evict_device_leaf``, the step ``UnifiedRadixCache._evict_components`` runs.
"""

from __future__ import annotations

import torch


def _is_unified(tree) -> bool:
    return hasattr(tree, "tree_core")


def _sink_offsets(start: int, end: int, page_size: int, sink_pages: int) -> list[int]:
    """Token offsets, within a tree node spanning path positions ``[start, end)``, of the
    first tokens of sink pages."""
    first = -(-start // page_size) * page_size
    return [p - start for p in range(first, min(end, sink_pages * page_size), page_size)]


def _radix_sink_nodes(tree, page_size: int, sink_pages: int):
    """``(node, page id)`` of every sink page cached in a ``RadixCache``."""
    out, stack = [], [(child, 0) for child in tree.root_node.children.values()]
    while stack:
        node, start = stack.pop()
        end = start + len(node.key)
        if start >= sink_pages * page_size or node.evicted:
            continue
        for o in _sink_offsets(start, end, page_size, sink_pages):
            out.append((node, int(node.value[o]) // page_size))
        stack += [(child, end) for child in node.children.values()]
    return out


def _unified_leaves_lru(tree):
    """Node ids of a ``UnifiedRadixCache``'s evictable device leaves, least recently used
    first (SGLang's eviction walk, nothing evicted)."""
    from sglang.srt.mem_cache.unified_cache.components import ComponentType

    full, leaves = ComponentType.FULL, []
    tracker = dict.fromkeys(tree.tree_components, 0)
    tree.tree_core.evict_device_start(full, tree.evictable_size() + 1)
    try:
        while True:
            node_id, progressed = tree._evict_device_next_node(full, tracker)
            if node_id is None and not progressed:
                return leaves
            if node_id is not None:
                leaves.append(node_id)
    finally:
        tree.tree_core.evict_device_end(full)


def evictable_sinks(tree, page_size: int, sink_pages: int) -> list[int]:
    """Page ids of the sink pages of cached prefixes that no request locks, least recently
    used subtree first (a subtree's last use: ``RadixCache``, its sink node's access time,
    which every match through it refreshes; ``UnifiedRadixCache``, its most recently used
    leaf in SGLang's LRU order)."""
    if sink_pages == 0 or tree is None or not tree.supports_prefix_sharing():
        return []
    if not _is_unified(tree):
        found = [
            (n, p) for n, p in _radix_sink_nodes(tree, page_size, sink_pages) if not n.lock_ref
        ]
        return [p for n, p in sorted(found, key=lambda np: np[0].last_access_time)]
    walk = tree.tree_core.walk_for_kv_canary(unlocked_only=True, swa_resident_only=False)
    pos, slots = walk.positions.to(torch.int64), walk.slot_indices.to(torch.int64)
    keep = (pos % page_size == 0) & (pos < sink_pages * page_size)
    unlocked = set((slots[keep] // page_size).tolist())
    if not unlocked:
        return []
    last_used, pages_of = {}, _NodeSinks(tree, page_size, sink_pages)
    for rank, leaf in enumerate(_unified_leaves_lru(tree)):
        for info in tree.tree_core.collect_path_info([leaf])[0]:
            for page in pages_of(info):
                last_used[page] = rank
    return sorted(unlocked, key=lambda p: last_used.get(p, -1))


class _NodeSinks:
    """The sink page ids a ``UnifiedRadixCache`` node holds, per ``TreePathNodeInfo``
    (cached by node id: one device read per node)."""

    def __init__(self, tree, page_size: int, sink_pages: int) -> None:
        from sglang.srt.mem_cache.unified_cache.components import ComponentType

        self.core, self.full = tree.tree_core, ComponentType.FULL
        self.g, self.sinks, self.seen = page_size, sink_pages, {}

    def __call__(self, info) -> list[int]:
        if info.node_id not in self.seen:
            offsets = _sink_offsets(info.path_start, info.path_end, self.g, self.sinks)
            value = self.core.get_component_device_value(info.node_id, self.full)
            pages = [] if value is None or not offsets else (value[offsets] // self.g).tolist()
            self.seen[info.node_id] = pages
        return self.seen[info.node_id]


def evict_sink_subtree(tree, page: int, page_size: int, sink_pages: int) -> int:
    """Evict the cached subtree whose sink page is ``page`` (the subtree of the tree node that
    holds it); the number of tokens evicted (0 if no unlocked node holds ``page``)."""
    if _is_unified(tree):
        return _evict_unified(tree, page, page_size, sink_pages)
    return _evict_radix(tree, page, page_size, sink_pages)


def _evict_radix(tree, page: int, page_size: int, sink_pages: int) -> int:
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    found = [n for n, p in _radix_sink_nodes(tree, page_size, sink_pages) if p == page]
    if not found or found[0].lock_ref > 0:
        return 0
    target = found[0]
    members, size, todo = set(), 0, [target]
    while todo:
        node = todo.pop()
        members.add(id(node))
        size += len(node.value)
        todo += list(node.children.values())

    base = tree.eviction_strategy

    class _SubtreeFirst:
        def get_priority(self, node):
            return (id(node) not in members, base.get_priority(node))

    tree.eviction_strategy = _SubtreeFirst()
    try:
        return tree.evict(EvictParams(num_tokens=size)).num_tokens_evicted
    finally:
        tree.eviction_strategy = base


def _evict_unified(tree, page: int, page_size: int, sink_pages: int) -> int:
    from sglang.srt.mem_cache.unified_cache.components import ComponentType

    core, full = tree.tree_core, ComponentType.FULL
    pages_of = _NodeSinks(tree, page_size, sink_pages)
    tracker = dict.fromkeys(tree.tree_components, 0)
    core.evict_device_start(full, tree.evictable_size() + page_size)
    try:
        while True:
            node_id, progressed = tree._evict_device_next_node(full, tracker)
            if node_id is None:
                if not progressed:
                    break
                continue
            path = core.collect_path_info([node_id])[0]
            if any(page in pages_of(info) for info in path):
                holds = page in pages_of(path[-1])
                _evict_unified_leaf(tree, node_id, tracker)
                if holds:
                    break  # the node holding the sink page is gone: its slot is back
    finally:
        core.evict_device_end(full)
    return tracker[full]


def _evict_unified_leaf(tree, node_id, tracker) -> None:
    """Evict one device leaf the way ``UnifiedRadixCache._evict_components`` does: with
    HiCache a backed-up leaf is demoted to host memory (its device pages and sink slot freed,
    its host copy kept); under ``--hicache-write-policy write_back`` an unbacked leaf is backed
    up first and then demoted, or dropped when host memory cannot take it."""
    backup = tree._evict_device_leaf(node_id, tracker)
    if backup is None:
        return
    if tree._execute_and_commit_kv_backup(backup, write_back=True) > 0:
        tree.writing_check(write_back=True)
        tree._demote(node_id, tracker)
    else:
        tree._drop_subtree_no_host(node_id, tracker)
