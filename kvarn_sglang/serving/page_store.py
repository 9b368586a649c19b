"""Device storage of a KVarN KV cache: packed pages plus a pool of fp16 page slots.

A page id (SGLang's ``token_slot // page_size``) owns one packed record per layer and KV head
in ``packed[layer]``; while it is filling, and for good if it is a sink page, it also owns an
fp16 slot (``slot_k/slot_v[layer][slot]``, the same slot id in every layer).

A page's life, step by step and who drives each step, is drawn in ``pages``; this store holds
what each step touches: ``assign_slots`` (slot assigned), ``write`` (written), ``commit_slots``
and ``commit`` (committed), ``begin_pass``/``flush_released``/``keep_slots`` (slot released)
and ``forget_pages`` (page freed).

Page 0 is SGLang's padding page, and every page without a slot points at one extra *scratch*
slot (index ``num_slots``): padded writes, and reads of padded rows, land there without a
mask or a host synchronisation, which keeps the decode path capturable in a CUDA graph.

Taking and releasing slots never synchronises with the device: the free slot ids live in a
device stack whose height is tracked on the host. Only ``forget_pages`` (pages freed by the
allocator, which may or may not hold a slot) reads one count back.

Every byte here is allocated up front and counted in ``nbytes``. With SGLang's memory saver
(``--enable-memory-saver``, which RL frameworks use to hand the GPU to training between
rollouts) the packed pages and fp16 slots are allocated inside the KV-cache region that
``release_memory_occupation`` unmaps, while the bookkeeping (``page_slot``, ``commits``, the
free stack) stays outside it: SGLang flushes the cache right after unmapping (``reset``
rewrites only the bookkeeping), and after ``resume_memory_occupation`` the pages and slots
hold arbitrary bytes that nothing reads before it is written (no page is allocated, and
attention reads only the written positions of a slot).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.numerics import PagedKVCache
from kvarn_sglang.quant.reference import quantize_pages


class SlotPoolExhausted(RuntimeError):
    """More filling or sink pages than fp16 slots."""


class PageStore:
    """Packed pages and fp16 slots for every layer of one pool.

    Attributes:
        packed: per layer ``uint8 [num_pages, H, page_bytes]``.
        slot_k, slot_v: per layer ``[num_slots + 1, G, H, D]`` in the model dtype; the last
            slot is the scratch slot.
        page_slot: ``int64 [num_pages]``, the slot of a page, ``num_slots`` (scratch) if none.
        commits: ``int32 [num_pages]``, how often each page was quantized (layer 0 counts).
        use_kernels: commit (and, in the backend, attend) with the Triton kernels; True on
            CUDA, the torch reference otherwise (tests set it on CPU to run the kernels in
            Triton's interpreter).
        scale_index: ``int64 [M]``, the fp16 elements of a record that hold its metadata.
    """

    def __init__(
        self,
        config: KVarNConfig,
        *,
        num_pages: int,
        num_slots: int,
        layer_num: int,
        head_num: int,
        dtype: torch.dtype,
        device: str | torch.device,
        buffers_region: AbstractContextManager | None = None,
    ) -> None:
        """``buffers_region``: the context (SGLang's memory-saver KV-cache region) in which
        the packed pages and fp16 slots are allocated; the bookkeeping is allocated outside."""
        if dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"Unsupported dtype of the fp16 slot pool: {dtype} (fp16 or bf16)")
        if num_slots < 1:
            raise ValueError(f"Invalid num_slots {num_slots}: need at least one fp16 slot")
        g, d = config.page_size, config.head_dim
        self.config, self.num_pages, self.num_slots = config, num_pages, num_slots
        self.scratch = num_slots
        shape, record = (num_slots + 1, g, head_num, d), (num_pages, head_num, config.page_bytes)
        with buffers_region or nullcontext():
            self.packed = [
                torch.zeros(record, dtype=torch.uint8, device=device) for _ in range(layer_num)
            ]
            self.slot_k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layer_num)]
            self.slot_v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layer_num)]
        self.page_slot = torch.full((num_pages,), num_slots, dtype=torch.int64, device=device)
        self.commits = torch.zeros(num_pages, dtype=torch.int32, device=device)
        self._stack = torch.arange(num_slots, dtype=torch.int64, device=device)
        self._top = num_slots
        self._pending: list[torch.Tensor] = []
        self.use_kernels = torch.device(device).type == "cuda"
        spans = [
            torch.arange(f.offset // 2, (f.offset + f.nbytes) // 2)
            for f in config.layout.fields
            if f.dtype == torch.float16
        ]
        self.scale_index = torch.cat(spans).to(device)

    @property
    def nbytes(self) -> int:
        """Device bytes held: packed pages, fp16 slots (scratch included) and page tables."""
        tensors = [*self.packed, *self.slot_k, *self.slot_v, self.page_slot, self.commits]
        tensors.append(self._stack)
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def slot_nbytes(self) -> int:
        """Device bytes of the fp16 slots (scratch included), part of ``nbytes``."""
        return sum(t.numel() * t.element_size() for t in (*self.slot_k, *self.slot_v))

    @property
    def free_slots(self) -> int:
        """Slots free once the releases of finished passes are applied."""
        return self._top + sum(len(p) for p in self._pending)

    def free_slot_ids(self) -> torch.Tensor:
        """``int64 [free_slots]``: the free slot ids (after pending releases)."""
        self.flush_released()
        return self._stack[: self._top]

    def held_mask(self) -> torch.Tensor:
        """``bool [num_pages]``: which pages hold an fp16 slot (after pending releases)."""
        self.flush_released()
        return self.page_slot != self.scratch

    def reset(self) -> None:
        """Forget every page (the allocator was cleared)."""
        self.page_slot.fill_(self.scratch)
        self.commits.zero_()
        self._stack.copy_(torch.arange(self.num_slots, device=self._stack.device))
        self._top = self.num_slots
        self._pending.clear()

    def assign_slots(self, page_ids: torch.Tensor) -> None:
        """Give each of the distinct, slot-less pages ``page_ids [n]`` an fp16 slot.

        The caller (the allocator) knows the pages are new; no device value is read back.
        """
        n = page_ids.numel()
        if n == 0:
            return
        self.flush_released()
        if n > self._top:
            raise SlotPoolExhausted(
                f"{n} pages need an fp16 slot but {self._top} of {self.num_slots} are free; "
                f"raise --kvarn-slots or lower --max-running-requests"
            )
        self._top -= n
        self.page_slot[page_ids] = self._stack[self._top : self._top + n]

    def begin_pass(self, committed_from_slots: torch.Tensor) -> None:
        """A forward pass starts: apply the releases of earlier passes, and schedule the
        slots of the pages ``committed_from_slots [m]`` (each holds one; this pass commits
        them) to come back once it has run. The page ids are copied: CUDA-graph decode
        passes a view of a static buffer that it refills for the next pass."""
        self.flush_released()
        if committed_from_slots.numel():
            self._pending.append(committed_from_slots.clone())

    def keep_slots(self, pages: torch.Tensor) -> None:
        """Withdraw the scheduled releases of ``pages [m]``: the pass that was to commit them
        from their slots did not (``request_guard``), so they keep their slots until the
        allocator frees them. Reads the pending lists back (only on this rare path)."""
        if pages.numel() and self._pending:
            self._pending = [p[~torch.isin(p, pages)] for p in self._pending]

    def _release(self, pages: torch.Tensor, slots: torch.Tensor) -> None:
        """Push ``slots`` (held by ``pages``, or a subset) back on the free stack and point
        ``pages`` at the scratch slot."""
        m = slots.numel()
        self._stack[self._top : self._top + m] = slots
        self._top += m
        self.page_slot[pages] = self.scratch

    def flush_released(self) -> None:
        """Apply deferred releases: their slots return to the free stack."""
        for pages in self._pending:
            self._release(pages, self.page_slot[pages])
        self._pending.clear()

    def forget_pages(self, page_ids: torch.Tensor) -> None:
        """The allocator freed ``page_ids``: release the slots they hold and their counts."""
        if page_ids.numel() == 0:
            return
        self.flush_released()
        pages = torch.unique(page_ids[page_ids > 0])
        slots = self.page_slot[pages]
        # One host synchronisation: how many of the pages held a slot.
        self._release(pages, slots[slots != self.scratch])
        self.commits[pages] = 0

    def write(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens ``k, v [N, H, D]`` at token slots ``loc [N]`` into their pages' fp16
        slots; tokens of pages without a slot (page 0, padding) land in the scratch slot."""
        g = self.config.page_size
        slot = self.page_slot[loc // g]
        offset = loc % g
        self.slot_k[layer][slot, offset] = k.to(self.slot_k[layer].dtype)
        self.slot_v[layer][slot, offset] = v.to(self.slot_v[layer].dtype)

    def commit_slots(
        self, layer: int, page_ids: torch.Tensor, *, check_finite: bool = True
    ) -> None:
        """Quantize the fp16 slots of full pages ``page_ids`` into their packed records.
        The slots stay held: the pages' own tokens still read them in this forward pass. The
        kernel reads the slots where they are: nothing is gathered, and an entry padding the
        static commit list of graph decode (page 0) costs a skipped tile, no copy."""
        if page_ids.numel() == 0:
            return
        slots = self.page_slot[page_ids]
        if self.use_kernels:  # the kernel reads the slots in place; page 0 (padding) reads none
            from kvarn_sglang.kernels.commit import commit_pages

            sk, sv = self.slot_k[layer], self.slot_v[layer]
            commit_pages(
                sk, sv, self.config, self.packed[layer], page_ids,
                check_finite=check_finite, skip_row0=True, in_index=slots,
            )  # fmt: skip
            if layer == 0:
                self.commits[page_ids] += 1
            return
        k, v = self.slot_k[layer][slots], self.slot_v[layer][slots]
        self.commit(layer, page_ids, k, v, check_finite=check_finite)

    def commit(
        self,
        layer: int,
        page_ids: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        check_finite: bool = True,
    ) -> None:
        """Quantize full pages ``k, v [P, G, H, D]`` into the packed records of ``page_ids``.

        ``check_finite`` rejects NaN/Inf before anything is written (one host synchronisation
        on CUDA; the CPU reference always checks). CUDA-graph replay passes False.
        """
        if page_ids.numel() == 0:
            return
        k, v = k.to(self.slot_k[layer].dtype), v.to(self.slot_v[layer].dtype)
        if self.use_kernels:
            from kvarn_sglang.kernels.commit import commit_pages

            commit_pages(
                k, v, self.config, self.packed[layer], page_ids,
                check_finite=check_finite, skip_row0=True,
            )  # fmt: skip
        else:
            keep = page_ids > 0  # page 0 pads the static commit list of graph decode
            if keep.any():
                # Scales beyond fp16 are stored as the kernel stores them; the backend checks
                # every record it commits (``check_scales``) and fails its request alone.
                records = quantize_pages(k[keep], v[keep], self.config, check_range=False)
                self.packed[layer][page_ids[keep]] = records
        if layer == 0:
            self.commits[page_ids] += 1

    def check_scales(self, layer: int, page_ids: torch.Tensor) -> torch.Tensor:
        """``bool [P]``: whether the fp16 metadata (scales, zero points, norms) of the records
        of ``page_ids [P]`` in ``layer`` is finite for every KV head. A record whose metadata
        is not (finite K/V beyond what a page's fp16 scales hold) gets all-zero metadata, so
        it reads as zeros, finite, until its page is freed. Page 0 (padding) always passes.
        Device operations only (graph-capturable)."""
        f16 = self.packed[layer].view(torch.float16)  # [num_pages, H, page_bytes / 2]
        at = (page_ids[:, None], slice(None), self.scale_index[None, :])
        meta = f16[at]  # [P, M, H]
        ok = torch.isfinite(meta).flatten(1).all(1) | (page_ids == 0)
        f16[at] = torch.where(ok[:, None, None], meta, torch.zeros_like(meta))
        return ok

    def view(self, layer: int) -> PagedKVCache:
        """The store of one layer as the attention functions take it."""
        return PagedKVCache(
            self.packed[layer], self.slot_k[layer], self.slot_v[layer], self.page_slot
        )
