"""``KVarNAttnBackend``: SGLang attention over a ``KVarNTokenToKVPool``.

Per forward pass, ``init_forward_metadata`` plans the pages (``pages``, ``forward_plan``) and
schedules, in one place (``_begin_pass``), the release of the fp16 slots of the pages this
pass commits from them; the allocator already gave every page that receives tokens and needs
one an fp16 slot. Per layer, ``forward_extend``/``forward_decode``

1. screen the new K/V (``request_guard.screen``): a token with a NaN/Inf is stored as zeros
   and flags its request, whose pages this pass then does not commit; the scheduler aborts
   the flagged requests after the pass (``kvarn_sglang.patches.scheduler``);
2. write the new K/V into fp16 slots (``set_kv_buffer``);
3. in extend, commit the pages completed in this pass (quantize once, per layer) before
   attention, so later tokens of the same pass read them quantized, as decode-consistent
   semantics require;
4. run attention: the Triton kernels on CUDA, the torch reference elsewhere (the same
   semantics; the kernels are tested against it). A layer with a sliding window
   (``RadixAttention.sliding_window_size``, Gemma 3) reads only the pages its queries' windows
   reach and masks the boundary page; every layer still stores every page, because the window
   is a mask over SGLang's one KV pool (its separate window pool is refused);
5. in decode, commit the completed pages after attention (the completing token reads its
   own page in fp16): on CUDA on a side stream, hidden under the remaining layers and
   joined by the last (``_commit_after_attention``).

The scheduled releases are applied when the next pass or allocation starts, after this pass
has run (``pages`` draws a page's whole life).

Decode can be captured in a CUDA graph (``--cuda-graph-backend-decode full``):
``init_cuda_graph_state`` allocates a static page table and a static commit list;
``init_forward_metadata_out_graph`` fills them before every replay from host lengths (no
host synchronisation), pads the commit list with page 0 (its slot is the scratch slot), and
schedules the slot releases; the captured layers then run the same code as eager decode.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from kvarn_sglang.quant.page_attention import FULL, LayerAttention
from kvarn_sglang.quant.reference import ref_decode_attention, ref_extend_attention
from kvarn_sglang.serving.device_check import facts_of, refuse_device
from kvarn_sglang.serving.forward_plan import (
    CLEAN,
    ForwardPlan,
    build_plan,
    clean_rows,
    gather_pages,
    page_table_of,
)
from kvarn_sglang.serving.model_check import refuse_unsupported_layers
from kvarn_sglang.serving.pages import pass_pages
from kvarn_sglang.serving.pool import KVarNTokenToKVPool
from kvarn_sglang.serving.request_guard import guard_scales, pages_to_commit, screen

logger = logging.getLogger(__name__)


class KVarNAttnBackend(AttentionBackend):
    """Decode-consistent attention over packed KVarN pages (see the module docstring)."""

    # Planning reads host lengths (which pages complete in a pass), in graph replay too.
    needs_cpu_seq_lens: bool = True

    def __init__(self, model_runner) -> None:
        super().__init__()
        pool = model_runner.token_to_kv_pool
        # A hybrid linear-attention model (Qwen3-Next): SGLang's HybridLinearKVPool holds the
        # KVarN pool for the full-attention layers (numbered densely) beside its recurrent
        # state pool, and its HybridLinearAttnBackend hands this backend those layers only.
        self.layer_ids = getattr(pool, "full_attention_layer_id_mapping", None)
        pool = getattr(pool, "full_kv_pool", pool)
        if not isinstance(pool, KVarNTokenToKVPool):
            raise ValueError(
                f"Unsupported KV pool {type(pool).__name__}: --attention-backend kvarn needs "
                f"--kv-cache kvarn"
            )
        model = getattr(model_runner, "model", None)
        if model is not None:  # the scheduler's model runner (tests may pass none)
            refuse_unsupported_layers(model)
        refuse_device(facts_of(torch.device(pool.device)), pool.dtype)  # startup checked too
        self.pool = pool
        # What SGLang's wrappers (HybridLinearAttnBackend) read from the backend they wrap.
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.config = pool.kvarn_config
        self.plan: ForwardPlan | None = None
        self.graph_page_table: torch.Tensor | None = None
        self.graph_commits: torch.Tensor | None = None
        self.graph_commit_rows: torch.Tensor | None = None
        self.graph_bad_layer: torch.Tensor | None = None
        self.graph_token_rows: torch.Tensor | None = None
        self._side_stream = None
        if pool.store.use_kernels:
            self.warm_up(_query_heads(model_runner), _has_windows(model_runner))

    def warm_up(self, num_q_heads: int | None, windowed: bool = False) -> tuple[int, float] | None:
        """Compile every kernel variant serving needs now, at startup (``kernels.warmup``),
        and log how many and how long; without the model's query heads, Triton compiles each
        at its first launch instead."""
        if num_q_heads is None:
            logger.warning("KVarN: query heads unknown; kernels compile at first use instead")
            return None
        from kvarn_sglang.kernels.warmup import warm_up

        store = self.pool.store
        n, seconds = warm_up(
            self.config, num_q_heads, store.packed[0].shape[1], store.slot_k[0].dtype,
            store.packed[0].device, windowed,
        )  # fmt: skip
        logger.info(
            "KVarN: compiled %d kernel variants (decode, extend, commit) in %.1f s at startup; "
            "serving compiles none",
            n,
            seconds,
        )
        return n, seconds

    # ------------------------------------------------------------------ eager metadata
    def init_forward_metadata(self, forward_batch) -> None:
        seq = [int(x) for x in forward_batch.seq_lens_cpu.tolist()]
        if forward_batch.forward_mode.is_decode():
            prefix = [s - 1 for s in seq]
        else:
            prefix = [int(x) for x in forward_batch.extend_prefix_lens_cpu]
        plan = build_plan(
            self.req_to_token,
            forward_batch.req_pool_indices,
            prefix,
            seq,
            self.config.page_size,
            self.config.sink_pages,
        )
        self._begin_pass(plan, plan.slot_commits)

    # ------------------------------------------------------------------ CUDA-graph decode
    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Static buffers of captured decode: ``graph_page_table int64 [max_bs,
        max_context / G]``, ``graph_commits int64 [max_bs]`` (page 0 = nothing) with their
        batch rows ``graph_commit_rows int64 [max_bs]``, and ``graph_bad_layer int32
        [max_bs]`` (``request_guard``)."""
        from sglang.srt.environ import envs

        if envs.SGLANG_ENABLE_METADATA_GLUE_GRAPH.get():  # refused at startup as well
            raise ValueError(
                "KVarN plans each captured decode step on the host, which SGLang's metadata "
                "glue graph skips: unset SGLANG_ENABLE_METADATA_GLUE_GRAPH"
            )
        g, dev = self.config.page_size, self.req_to_token.device
        max_pages = -(-self.req_to_token.shape[1] // g)
        self.graph_page_table = torch.zeros(max_bs, max_pages, dtype=torch.long, device=dev)
        self.graph_commits = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.graph_commit_rows = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.graph_bad_layer = clean_rows(max_bs, dev)
        self.graph_token_rows = torch.arange(max_bs, dtype=torch.long, device=dev)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """Fill the static decode buffers for a padded batch of ``forward_batch.batch_size``
        rows (the last ``num_padding`` are padding, with sequence length 1)."""
        if self.graph_page_table is None or not forward_batch.forward_mode.is_decode():
            raise ValueError(
                "KVarN captures decode only: call init_cuda_graph_state first and keep "
                "--cuda-graph-backend-prefill disabled"
            )
        g, sink = self.config.page_size, self.config.sink_pages
        bs = forward_batch.batch_size
        real = bs - int(getattr(forward_batch, "num_padding", 0) or 0)
        seq_cpu = getattr(forward_batch, "seq_lens_cpu", None)
        if seq_cpu is None and not in_capture:
            raise ValueError("KVarN graph decode needs the batch's seq_lens_cpu")
        seq = [] if seq_cpu is None else [int(x) for x in seq_cpu[:real].tolist()]
        table = self.graph_page_table[:bs]
        table.copy_(
            page_table_of(self.req_to_token, forward_batch.req_pool_indices, table.shape[1], g)
        )
        commits, rows = self.graph_commits[:bs], self.graph_commit_rows[:bs]
        commits.zero_()
        rows.zero_()
        bad_layer = self.graph_bad_layer[:bs]
        bad_layer.fill_(CLEAN)
        # A decode step completes a page from its slot, never directly (G > 1).
        from_slots = pass_pages([s - 1 for s in seq], seq, g, sink).from_slots
        if from_slots and not in_capture:
            commits[: len(from_slots)] = gather_pages(table, from_slots)
            rows[: len(from_slots)] = torch.tensor([b for b, _ in from_slots]).to(rows.device)
        plan = ForwardPlan(
            page_table=table,
            prefix_lens=forward_batch.seq_lens[:bs] - 1,
            extend_lens=torch.ones_like(forward_batch.seq_lens[:bs]),
            seq_lens=forward_batch.seq_lens[:bs],
            slot_commits=commits,
            direct_pages=commits[:0],
            direct_rows=commits[:0].view(0, g),
            token_rows=self.graph_token_rows[:bs],
            slot_commit_rows=rows,
            direct_page_rows=rows[:0],
            bad_layer=bad_layer,
            in_graph=True,
        )
        self._begin_pass(plan, commits[: len(from_slots)])  # not the page-0 padding

    def _begin_pass(self, plan: ForwardPlan, released: torch.Tensor) -> None:
        """The one place where a pass's slot releases are scheduled, eager and graph alike:
        the pages ``released`` that this pass commits from their fp16 slots hand the slots
        back once it has run (``PageStore.begin_pass``). The pool keeps the plan for the
        scheduler, which reads its ``bad_layer`` after the pass (``request_guard``)."""
        side = self._side_stream
        if side is not None and not torch.cuda.is_current_stream_capturing():
            # The last pass's decode commits (joined by its last layer already, unless the
            # model ran fewer layers through this backend).
            torch.cuda.current_stream(side.device).wait_stream(side)
        self.pool.store.begin_pass(released)
        self.plan = plan
        self.pool.pass_plan = plan

    def init_forward_metadata_in_graph(self, forward_batch) -> None:
        """Nothing to record: the static buffers are filled before every replay."""

    # ------------------------------------------------------------------ per layer
    def local_layer(self, layer_id: int) -> int:
        """The pool's index of model layer ``layer_id``."""
        if self.layer_ids is not None:
            return self.layer_ids[layer_id]
        return layer_id - self.pool.start_layer

    @staticmethod
    def layer_attention(layer) -> LayerAttention:
        """The window of a ``RadixAttention`` layer (soft-capping and sinks are refused at
        startup, ``model_check`` and ``patches.server_args``)."""
        window = getattr(layer, "sliding_window_size", None)
        return FULL if window is None or window < 0 else LayerAttention(window_left=window)

    def write_kv(self, k, v, layer, forward_batch, save_kv_cache: bool = True, commit=True):
        """Screen and store one layer's new ``k, v [N, Hkv, D]`` and (``commit``) commit the
        pages they complete (without attention); returns the pool's local layer index and the
        screened ``k, v``."""
        if not save_kv_cache:
            raise ValueError("KVarN needs every K/V write through the pool (save_kv_cache=True)")
        store, plan = self.pool.store, self.plan
        local = self.local_layer(layer.layer_id)
        # Pages loaded back from host memory (HiCache) arrive layer by layer: this layer's
        # must have landed before it commits or reads anything.
        self.pool.wait_for_layer(local)
        k, v = screen(k, v, plan, layer.layer_id)
        pool_layer = local + self.pool.start_layer
        self.pool.set_kv_buffer(
            layer, forward_batch.out_cache_loc, k, v, layer_id_override=pool_layer
        )
        if not commit:
            return local, k, v
        # Screened: nothing non-finite reaches a commit, so the commit's own check (a host
        # synchronisation per layer on CUDA) is skipped.
        slot_pages = pages_to_commit(plan.slot_commits, plan.slot_commit_rows, plan)
        store.commit_slots(local, slot_pages, check_finite=False)
        direct = pages_to_commit(plan.direct_pages, plan.direct_page_rows, plan)
        rows = plan.direct_rows
        store.commit(local, direct, k[rows], v[rows], check_finite=False)
        committed = torch.cat([slot_pages, direct])
        if committed.numel():  # finite K/V can still be beyond what fp16 scales hold
            owners = torch.cat([plan.slot_commit_rows, plan.direct_page_rows])
            guard_scales(store, local, committed, owners, plan, layer.layer_id)
        return local, k, v

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kw):
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        k, v = k.view(-1, hkv, d), v.view(-1, hkv, d)
        local, k, v = self.write_kv(k, v, layer, forward_batch, save_kv_cache)
        slot_dtype = self.pool.store.slot_k[local].dtype
        args = (
            q.view(-1, hq, d),
            k.to(slot_dtype),
            v.to(slot_dtype),
            self.pool.store.view(local),
            self.plan.page_table,
            self.plan.prefix_lens,
            self.plan.extend_lens,
            self.config,
            layer.scaling,
        )
        attn = self.layer_attention(layer)
        if self.pool.store.use_kernels:
            from kvarn_sglang.kernels.extend import extend_attention

            # The pass's block table, made once from host lengths: no per-layer read-back.
            out = extend_attention(
                *args, blocks=self.plan.extend_blocks_for(self.config, hq // hkv),
                window_left=attn.window_left,
            )  # fmt: skip
        else:
            out = ref_extend_attention(*args, attn=attn)
        return out.to(q.dtype).reshape(-1, hq * d)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, **kw):
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        # The commit waits until after attention. Decode's one new token per request never
        # fills a page by itself (G > 1), so all its pages commit from their fp16 slots.
        local, _, _ = self.write_kv(
            k.view(-1, hkv, d), v.view(-1, hkv, d), layer, forward_batch, save_kv_cache, False
        )
        args = (
            q.view(-1, hq, d),
            self.pool.store.view(local),
            self.plan.page_table,
            self.plan.seq_lens,
            self.config,
            layer.scaling,
        )
        attn = self.layer_attention(layer)
        if self.pool.store.use_kernels:
            from kvarn_sglang.kernels.decode import decode_attention

            out = decode_attention(*args, window_left=attn.window_left)
        else:
            out = ref_decode_attention(*args, attn=attn)
        self._commit_after_attention(local, layer.layer_id)
        return out.to(q.dtype).reshape(-1, hq * d)

    def _commit_after_attention(self, local: int, layer_id: int) -> None:
        """Decode's commit, off the critical path. A decode step's completing token reads its
        own page in fp16 (decode-consistent), so the packed record is first needed by the
        next step: the commit is launched after the layer's attention, on a side stream on
        CUDA (an event orders it after this layer's slot writes and attention), and overlaps
        the remaining layers; the last layer joins the side stream back, so the step ends
        with every page committed (the next step's reads and slot releases come after it) and
        a CUDA graph captures one fork per layer and one join. The pages to commit are chosen
        on the main stream, from the request flags as of this layer, as in extend. Elsewhere
        (the CPU reference, tests) the commit runs in line, in the same order."""
        store, plan = self.pool.store, self.plan
        pages = pages_to_commit(plan.slot_commits, plan.slot_commit_rows, plan)
        side = self._commit_stream()
        if side is None:
            store.commit_slots(local, pages, check_finite=False)
            if pages.numel():
                guard_scales(store, local, pages, plan.slot_commit_rows, plan, layer_id)
            return
        main = torch.cuda.current_stream(pages.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            store.commit_slots(local, pages, check_finite=False)
            # Finite K/V beyond what a page's scales hold (as in ``write_kv``); the flags it
            # sets are read after the step, which joins this stream at the last layer.
            if pages.numel():
                guard_scales(store, local, pages, plan.slot_commit_rows, plan, layer_id)
        pages.record_stream(side)  # made on the main stream, read on the side stream
        if local == len(store.packed) - 1:
            main.wait_stream(side)

    def _commit_stream(self):
        """The side stream of decode commits (CUDA kernels only), made on first use."""
        if not self.pool.store.use_kernels or self.pool.store.page_slot.device.type != "cuda":
            return None
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.pool.store.page_slot.device)
        return self._side_stream


def _query_heads(model_runner) -> int | None:
    """Query heads of one attention tensor-parallel rank, as SGLang's Triton backend counts
    them; None when the runner has no model config (tests)."""
    try:
        from sglang.srt.runtime_context import get_parallel

        heads = model_runner.model_config.get_max_num_attention_heads()
        return heads // get_parallel().attn_tp_size
    except Exception:  # a runner without a model config or parallel context (tests)
        return None


def _has_windows(model_runner) -> bool:
    """Whether any attention layer of the runner's model has a sliding window
    (``RadixAttention.sliding_window_size >= 0``; -1 or None: none)."""
    model = getattr(model_runner, "model", None)
    if model is None or not hasattr(model, "modules"):
        return False
    sizes = (getattr(m, "sliding_window_size", None) for m in model.modules())
    return any(s is not None and s >= 0 for s in sizes)


def create_kvarn_backend(model_runner) -> KVarNAttnBackend:
    """Factory registered with SGLang's ``register_attention_backend("kvarn")``."""
    return KVarNAttnBackend(model_runner)
