"""Extend attention (prefill, chunked prefill, prefix-cache hits), decode-consistent.

Sizes: the new tokens are cut into blocks, one per (request, page they fall in), at most G
rows each; one program serves one block and one query head, so its queries share the same
own page. A program

1. streams every page before its own page, as a later token reads it: sink pages from fp16
   slots against the plain query, the other pages from packed records against the rotated
   query with scales folded in (as in ``decode.py``); these pages must already be committed,
   including pages that became full in this same extend;
2. reads its own page in fp16, causally: positions before the request's prefix length from
   the page's fp16 slot, newer positions from ``k_new/v_new``.

One online softmax (log2 domain) covers both; the packed part accumulates in the rotated
domain and is rotated back at the end, ``out = (acc_rot @ H + acc_plain) / l``. Block metadata
is built on the host from the extend lengths (one host sync, as SGLang's own extend does).

Reference: ``kvarn_sglang.reference.ref_extend_attention``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvarn_sglang.config import KVarNConfig
from kvarn_sglang.kernels.decode import LOG2E
from kvarn_sglang.kernels.page_tiles import fp16_page_step, packed_page_step, record_offsets
from kvarn_sglang.kernels.validate import INDEX_DTYPES, check_paged_inputs, slot_operand_dtype
from kvarn_sglang.reference import PagedKVCache, hadamard_matrix


@triton.jit
def _extend_kernel(
    q_ptr, qr_ptr,  # [T, Hq, D] fp32, contiguous
    kn_ptr, vn_ptr, stride_nt, stride_nh,  # new K/V [T, Hkv, D]
    pk_u8_ptr, pk_f16_ptr, stride_pp, stride_ph,
    sk_ptr, sv_ptr, stride_ss, stride_sg, stride_sh,
    page_slot_ptr, table_ptr, stride_tb,
    blk_ptr,  # [num_blocks, 5] int64: request, page index, first query position, prefix, end
    row0_ptr,  # [B] int64: row of each request's first new token
    h_ptr, out_ptr,  # H fp32 [D, D]; out [T, Hq, D] fp32
    qk_scale, sink_pages,
    kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, SLOT_DT: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // GROUP
    b = tl.load(blk_ptr + blk * 5)
    j = tl.load(blk_ptr + blk * 5 + 1)
    pos0 = tl.load(blk_ptr + blk * 5 + 2)
    pre = tl.load(blk_ptr + blk * 5 + 3)
    end = tl.load(blk_ptr + blk * 5 + 4)
    row0 = tl.load(row0_ptr + b)

    r = tl.arange(0, G)
    ch = tl.arange(0, D)
    q_pos = pos0 + r
    q_valid = q_pos < tl.minimum(end, (j + 1) * G)
    q_rows = row0 + q_pos - pre
    q_off = (q_rows * HQ + head)[:, None] * D + ch[None, :]
    q = tl.load(q_ptr + q_off, mask=q_valid[:, None], other=0.0).to(SLOT_DT)
    qr = tl.load(qr_ptr + q_off, mask=q_valid[:, None], other=0.0)

    m_i = tl.full((G,), float("-inf"), tl.float32)
    l_i = tl.zeros((G,), tl.float32)
    acc_r = tl.zeros((G, D), tl.float32)
    acc_p = tl.zeros((G, D), tl.float32)
    tok = tl.arange(0, G)
    every = (tok < G)[None, :]
    for jj in range(0, j):
        page = tl.load(table_ptr + b * stride_tb + jj)
        if jj < sink_pages:
            slot = tl.load(page_slot_ptr + page)
            kv_off = slot * stride_ss + tok[:, None] * stride_sg + kvh * stride_sh + ch[None, :]
            k = tl.load(sk_ptr + kv_off).to(SLOT_DT)
            v = tl.load(sv_ptr + kv_off).to(SLOT_DT)
            m_i, l_i, acc_r, acc_p = fp16_page_step(
                q, k, v, every, m_i, l_i, acc_r, acc_p, qk_scale
            )
        else:
            m_i, l_i, acc_r, acc_p = packed_page_step(
                qr, pk_u8_ptr, pk_f16_ptr, page * stride_pp + kvh * stride_ph,
                kc_off, vc_off, ks_off, kz_off, kn_off, vs_off, vz_off, vn_off,
                m_i, l_i, acc_r, acc_p, qk_scale, G, D, K_BITS, V_BITS,
            )  # fmt: skip

    # Own page in fp16: older positions from the slot, newer ones from k_new/v_new.
    k_pos = j * G + tok
    from_slot = k_pos < pre
    from_new = (k_pos >= pre) & (k_pos < end)
    slot = tl.load(page_slot_ptr + tl.load(table_ptr + b * stride_tb + j))
    s_off = slot * stride_ss + tok[:, None] * stride_sg + kvh * stride_sh + ch[None, :]
    n_off = (row0 + k_pos - pre)[:, None] * stride_nt + kvh * stride_nh + ch[None, :]
    k = tl.load(sk_ptr + s_off, mask=from_slot[:, None], other=0.0).to(tl.float32)
    k += tl.load(kn_ptr + n_off, mask=from_new[:, None], other=0.0).to(tl.float32)
    v = tl.load(sv_ptr + s_off, mask=from_slot[:, None], other=0.0).to(tl.float32)
    v += tl.load(vn_ptr + n_off, mask=from_new[:, None], other=0.0).to(tl.float32)
    k = k.to(SLOT_DT)
    v = v.to(SLOT_DT)
    causal = (k_pos[None, :] <= q_pos[:, None]) & (from_slot | from_new)[None, :]
    m_i, l_i, acc_r, acc_p = fp16_page_step(q, k, v, causal, m_i, l_i, acc_r, acc_p, qk_scale)

    h = tl.load(h_ptr + ch[:, None] * D + ch[None, :])
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out = (tl.dot(acc_r, h, input_precision="ieee") + acc_p) / l_i[:, None]
    tl.store(out_ptr + q_off, out, mask=q_valid[:, None])


def _blocks(prefix: list[int], extend: list[int], g: int) -> list[tuple[int, int, int, int, int]]:
    """(request, page index, first query position, prefix length, end) per block."""
    out = []
    for b, (pre, ext) in enumerate(zip(prefix, extend, strict=True)):
        end = pre + ext
        for j in range(pre // g, (end - 1) // g + 1 if ext else pre // g):
            out.append((b, j, max(pre, j * g), pre, end))
    return out


def extend_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: PagedKVCache,
    page_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    config: KVarNConfig,
    sm_scale: float,
) -> torch.Tensor:
    """Decode-consistent extend attention (Triton twin of ``ref_extend_attention``).

    Args:
        q: ``[T, Hq, D]`` new tokens of all requests, concatenated in request order.
        k_new, v_new: ``[T, Hkv, D]`` their post-RoPE K and V (head_dim contiguous).
        cache: the paged store; pages that became full in this extend must be committed, a
            partial prefix page and the sink pages must have fp16 slots.
        page_table: ``int [B, max_pages]``; prefix_lens, extend_lens: ``int [B]``.
    Returns:
        ``[T, Hq, D]`` in q's dtype.
    """
    t, hq, d, hkv = check_paged_inputs(q, cache, page_table, config)
    b = page_table.shape[0]
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if tuple(x.shape) != (t, hkv, d):
            raise ValueError(
                f"Invalid shape of {name}: expected [{t}, {hkv}, {d}], got {list(x.shape)}"
            )
        if x.stride(2) != 1 or x.device != q.device:
            raise ValueError(
                f"Invalid stride of {name}: head_dim must be contiguous, on {q.device}"
            )
    if k_new.stride() != v_new.stride():
        raise ValueError("Invalid stride of v_new: expected the strides of k_new")
    for name, x in (("prefix_lens", prefix_lens), ("extend_lens", extend_lens)):
        if x.shape != (b,) or x.dtype not in INDEX_DTYPES:
            got = f"{list(x.shape)} {x.dtype}"
            raise ValueError(f"Invalid shape of {name}: expected [{b}] int32/int64, got {got}")
    prefix, extend = prefix_lens.tolist(), extend_lens.tolist()
    if sum(extend) != t:
        raise ValueError(f"Invalid extend_lens: they sum to {sum(extend)}, q has {t} tokens")
    g = config.page_size
    blocks = _blocks(prefix, extend, g)
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=q.device)
    if not blocks:
        return out.to(q.dtype)
    blk = torch.tensor(blocks, dtype=torch.int64, device=q.device)
    row0 = torch.tensor([0, *extend[:-1]], device=q.device).cumsum(0)
    qf = q.float().contiguous()
    h = hadamard_matrix(d, q.device)
    qr = (qf @ h).contiguous()
    packed, sk, sv = cache.packed, cache.slot_k, cache.slot_v
    _extend_kernel[(len(blocks), hq)](
        qf, qr, k_new, v_new, k_new.stride(0), k_new.stride(1),
        packed, packed.view(torch.float16), packed.stride(0), packed.stride(1),
        sk, sv, sk.stride(0), sk.stride(1), sk.stride(2),
        cache.page_slot, page_table, page_table.stride(0),
        blk, row0, h, out,
        sm_scale * LOG2E, config.sink_pages,
        *record_offsets(config.layout),
        HQ=hq, G=g, D=d, GROUP=hq // hkv, K_BITS=config.k_bits, V_BITS=config.v_bits,
        SLOT_DT=slot_operand_dtype(sk),
    )  # fmt: skip
    return out.to(q.dtype)
