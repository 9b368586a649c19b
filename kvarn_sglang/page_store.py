"""Device storage of a KVarN KV cache: packed pages plus a pool of fp16 page slots.

A page id (SGLang's ``token_slot // page_size``) owns one packed record per layer and KV head
in ``packed[layer]``; while it is filling, and for good if it is a sink page, it also owns an
fp16 slot (``slot_k/slot_v[layer][slot]``, the same slot id in every layer). Slot lifetime
follows page lifetime: a slot is taken when a page receives its first token, handed back
when the page is committed (after the forward pass that filled it) or when the allocator
frees the page. Page 0 is SGLang's padding page: writes to it are dropped.

Every byte here is allocated up front and counted in ``nbytes``.
"""

from __future__ import annotations

import torch

from kvarn_sglang.config import KVarNConfig
from kvarn_sglang.reference import PagedKVCache, quantize_pages


class SlotPoolExhausted(RuntimeError):
    """More filling or sink pages than fp16 slots."""


class PageStore:
    """Packed pages and fp16 slots for every layer of one pool.

    Attributes:
        packed: per layer ``uint8 [num_pages, H, page_bytes]``.
        slot_k, slot_v: per layer ``[num_slots, G, H, D]`` in the model dtype.
        page_slot: ``int64 [num_pages]``, the slot of a page or -1.
        commits: ``int32 [num_pages]``, how often each page was quantized (layer 0 counts).
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
    ) -> None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"Unsupported dtype of the fp16 slot pool: {dtype} (fp16 or bf16)")
        g, d = config.page_size, config.head_dim
        self.config, self.num_pages, self.num_slots = config, num_pages, num_slots
        self.packed = [
            torch.zeros(num_pages, head_num, config.page_bytes, dtype=torch.uint8, device=device)
            for _ in range(layer_num)
        ]
        shape = (num_slots, g, head_num, d)
        self.slot_k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layer_num)]
        self.slot_v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layer_num)]
        self.page_slot = torch.full((num_pages,), -1, dtype=torch.int64, device=device)
        self.commits = torch.zeros(num_pages, dtype=torch.int32, device=device)
        self._free_slots = list(range(num_slots - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        """Device bytes held: packed pages, fp16 slots and the page tables."""
        tensors = [*self.packed, *self.slot_k, *self.slot_v, self.page_slot, self.commits]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def reset(self) -> None:
        """Forget every page (the allocator was cleared)."""
        self.page_slot.fill_(-1)
        self.commits.zero_()
        self._free_slots = list(range(self.num_slots - 1, -1, -1))

    def take_slots(self, page_ids: torch.Tensor) -> None:
        """Give every page in ``page_ids`` (page 0 ignored) an fp16 slot if it has none."""
        pages = torch.unique(page_ids[page_ids > 0])
        missing = pages[self.page_slot[pages] < 0].tolist()
        if len(missing) > len(self._free_slots):
            raise SlotPoolExhausted(
                f"{len(missing)} pages need an fp16 slot but {len(self._free_slots)} of "
                f"{self.num_slots} are free; raise --kvarn-slots or lower --max-running-requests"
            )
        if missing:
            slots = [self._free_slots.pop() for _ in missing]
            self.page_slot[torch.tensor(missing, device=self.page_slot.device)] = torch.tensor(
                slots, device=self.page_slot.device
            )

    def release_slots(self, page_ids: torch.Tensor) -> None:
        """Hand back the slots of ``page_ids`` (pages without one are skipped)."""
        if page_ids.numel() == 0:
            return
        pages = torch.unique(page_ids[page_ids > 0])
        slots = self.page_slot[pages]
        held = slots >= 0
        self._free_slots.extend(slots[held].tolist())
        self.page_slot[pages[held]] = -1

    def forget_pages(self, page_ids: torch.Tensor) -> None:
        """The allocator freed ``page_ids``: release their slots and commit counts."""
        self.release_slots(page_ids)
        self.commits[page_ids[page_ids > 0]] = 0

    def write(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store tokens ``k, v [N, H, D]`` at token slots ``loc [N]`` into their pages' fp16
        slots. Writes to page 0 (padding) are dropped."""
        g = self.config.page_size
        page, offset = loc // g, loc % g
        slot = self.page_slot[page]
        keep = (page > 0) & (slot >= 0)
        self.slot_k[layer][slot[keep], offset[keep]] = k[keep].to(self.slot_k[layer].dtype)
        self.slot_v[layer][slot[keep], offset[keep]] = v[keep].to(self.slot_v[layer].dtype)

    def commit_slots(self, layer: int, page_ids: torch.Tensor) -> None:
        """Quantize the fp16 slots of full pages ``page_ids`` into their packed records.
        The slots stay held: the pages' own tokens still read them in this forward pass."""
        if page_ids.numel() == 0:
            return
        slots = self.page_slot[page_ids]
        self.commit(layer, page_ids, self.slot_k[layer][slots], self.slot_v[layer][slots])

    def commit(self, layer: int, page_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize full pages ``k, v [P, G, H, D]`` into the packed records of ``page_ids``."""
        if page_ids.numel() == 0:
            return
        k, v = k.to(self.slot_k[layer].dtype), v.to(self.slot_v[layer].dtype)
        if k.is_cuda:
            from kvarn_sglang.kernels.commit import commit_pages

            commit_pages(k, v, self.config, self.packed[layer], page_ids)
        else:
            self.packed[layer][page_ids] = quantize_pages(k, v, self.config)
        if layer == 0:
            self.commits[page_ids] += 1

    def view(self, layer: int) -> PagedKVCache:
        """The store of one layer as the attention functions take it."""
        return PagedKVCache(
            self.packed[layer], self.slot_k[layer], self.slot_v[layer], self.page_slot
        )
