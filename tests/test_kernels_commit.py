"""The commit kernel against ``ref_commit_pages``."""

from __future__ import annotations

import pytest
import torch
from conftest import kv_like
from paged_helpers import device

from kvarn_sglang.format.config import KVarNConfig
from kvarn_sglang.format.layout import decode_tiles
from kvarn_sglang.kernels.commit import commit_pages
from kvarn_sglang.quant.reference import dequantize_pages, ref_commit_pages

# Codes may differ from the reference only where the reference sits on a rounding tie that
# a last-bit fp32 difference flips (the kernel computes some quotients as products; measured:
# one code in this suite, at head_dim 256).
MAX_DIFFERING_CODES = 1e-3
# Reconstructed values agree to fp16 metadata precision, compared in the rotated domain
# where a flipped code moves only its own element (which the bound above covers). The split
# of a value into row scale/zero and column norm may differ: once Sinkhorn has converged,
# successive iterations have the same imbalance up to fp32 noise (it is invariant to the
# row/column gauge), so the tie rule may keep another iteration's gauge; the product is the
# same.
RECON_RTOL = 4e-3


def _compare(out: torch.Tensor, ref: torch.Tensor, cfg: KVarNConfig) -> None:
    out = out.cpu()
    p, h = ref.shape[:2]
    flipped = []
    for got, want in zip(decode_tiles(out, cfg.layout), decode_tiles(ref, cfg.layout), strict=True):
        differing = got.codes != want.codes
        assert differing.float().mean().item() <= MAX_DIFFERING_CODES, differing.float().mean()
        flipped.append(differing)
    # Oriented tiles [P*H, D, G] (K) and [P*H, G, D] (V) -> [P, G, H, D].
    k_flip = flipped[0].view(p, h, *flipped[0].shape[1:]).permute(0, 3, 1, 2)
    v_flip = flipped[1].view(p, h, *flipped[1].shape[1:]).permute(0, 2, 1, 3)
    got = dequantize_pages(out, cfg, rotated=True)
    want = dequantize_pages(ref, cfg, rotated=True)
    for a, b, flip in zip(got, want, (k_flip, v_flip), strict=True):
        scale = b.abs().amax(dim=(1, 3), keepdim=True)  # per page and head
        close = (a - b).abs() <= RECON_RTOL * scale
        assert (close | flip).all(), float(((a - b).abs() / scale).max())


@pytest.mark.parametrize("g", [64, 128])
@pytest.mark.parametrize("v_bits", [2, 4])
@pytest.mark.parametrize("k_bits", [2, 4])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_commit_matches_reference(d, k_bits, v_bits, g):
    cfg = KVarNConfig(k_bits=k_bits, v_bits=v_bits, page_size=g, head_dim=d)
    # Two pages of one KV head: 4 programs (K and V) per case in Triton's interpreter; page
    # and head indexing with several heads is covered by the tests below.
    k, v = kv_like(2, g, 1, d, seed=d + k_bits, dtype=torch.float16)
    out = commit_pages(k.to(device()), v.to(device()), cfg)
    _compare(out, ref_commit_pages(k, v, cfg), cfg)


def test_commit_bf16_and_strided_input():
    cfg = KVarNConfig(k_bits=4, v_bits=2, page_size=64, head_dim=64)
    k, v = kv_like(2, 64, 3, 64, dtype=torch.bfloat16)
    wide_k = torch.zeros(2, 64, 3, 128, dtype=torch.bfloat16)
    wide_k[..., :64] = k
    out = commit_pages(wide_k[..., :64].to(device()), v.to(device()), cfg)
    _compare(out, ref_commit_pages(k, v, cfg), cfg)


def test_commit_writes_only_the_indexed_records():
    cfg = KVarNConfig(k_bits=4, v_bits=2, page_size=64, head_dim=64)
    k, v = kv_like(2, 64, 1, 64, dtype=torch.float16)
    store = torch.full((5, 1, cfg.page_bytes), 7, dtype=torch.uint8, device=device())
    commit_pages(k.to(device()), v.to(device()), cfg, store, torch.tensor([3, 1], device=device()))
    store = store.cpu()
    ref = ref_commit_pages(k, v, cfg)
    _compare(store[[3, 1]], ref, cfg)
    assert (store[[0, 2, 4]] == 7).all()
    kd, _ = dequantize_pages(store[[3]], cfg)
    assert torch.isfinite(kd).all()


def test_commit_skips_row_zero_entries_of_a_padded_commit_list():
    cfg = KVarNConfig(k_bits=4, v_bits=2, page_size=64, head_dim=64)
    k, v = kv_like(3, 64, 1, 64, dtype=torch.float16)
    k[1] = float("nan")  # a padding entry reads garbage; skipped without a NaN check
    store = torch.full((5, 1, cfg.page_bytes), 7, dtype=torch.uint8, device=device())
    index = torch.tensor([3, 0, 2], device=device())
    commit_pages(
        k.to(device()), v.to(device()), cfg, store, index, check_finite=False, skip_row0=True
    )
    store = store.cpu()
    _compare(store[[3, 2]], ref_commit_pages(k[[0, 2]], v[[0, 2]], cfg), cfg)
    assert (store[[0, 1, 4]] == 7).all()


def test_commit_reads_fp16_slots_in_place():
    """Graph decode's commit: pages named by slot id in the pool's slot tensor, the static
    list padded with page 0 (pointing at the scratch slot, garbage): no gather, same records."""
    cfg = KVarNConfig(k_bits=4, v_bits=2, page_size=64, head_dim=64)
    k, v = kv_like(3, 64, 2, 64, dtype=torch.float16)  # slots 0, 1 and the scratch slot 2
    k[2] = float("nan")
    store = torch.full((5, 2, cfg.page_bytes), 7, dtype=torch.uint8, device=device())
    pages, slots = torch.tensor([3, 0, 1]), torch.tensor([1, 2, 0])
    commit_pages(
        k.to(device()), v.to(device()), cfg, store, pages.to(device()),
        check_finite=False, skip_row0=True, in_index=slots.to(device()),
    )  # fmt: skip
    store = store.cpu()
    _compare(store[[3, 1]], ref_commit_pages(k[[1, 0]], v[[1, 0]], cfg), cfg)
    assert (store[[0, 2, 4]] == 7).all()
    with pytest.raises(ValueError, match="Invalid shape of in_index"):
        commit_pages(k, v, cfg, store, pages, in_index=slots.int())


def test_commit_rejects_non_finite_input_without_writing():
    cfg = KVarNConfig(k_bits=4, v_bits=2, page_size=64, head_dim=64)
    k, v = kv_like(2, 64, 1, 64, dtype=torch.float16)
    k[1, 3, 0, 5] = float("inf")
    store = torch.zeros(2, 1, cfg.page_bytes, dtype=torch.uint8, device=device())
    with pytest.raises(ValueError, match="Non-finite values in k: page 1, kv head 0"):
        commit_pages(k.to(device()), v.to(device()), cfg, store)
    assert (store == 0).all()


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            {"dtype": torch.float32},
            TypeError,
            "Unsupported dtype of k: expected float16 or bfloat16",
        ),
        ({"shape": (1, 32, 1, 64)}, ValueError, r"Invalid shape of k: expected \[num_pages, 64"),
        ({"clip": 0.01}, ValueError, "Unsupported clip_quantile 0.01"),
        ({"out": torch.zeros(1, 1, 10, dtype=torch.uint8)}, ValueError, "Invalid shape of out"),
        ({"index": torch.zeros(1, dtype=torch.int32)}, ValueError, "Invalid shape of out_index"),
        ({"v_dtype": torch.bfloat16}, TypeError, "Unsupported dtype of v"),
    ],
    ids=["fp32", "page_size", "clip", "out", "index", "v_dtype"],
)
def test_commit_rejects_bad_arguments(change, error, message):
    cfg = KVarNConfig(
        k_bits=4, v_bits=2, page_size=64, head_dim=64, clip_quantile=change.get("clip", 0.0)
    )
    k = torch.zeros(change.get("shape", (1, 64, 1, 64)), dtype=change.get("dtype", torch.float16))
    v = k.to(change.get("v_dtype", k.dtype)) if "v_dtype" in change else k.clone()
    with pytest.raises(error, match=message):
        commit_pages(k, v, cfg, change.get("out"), change.get("index"))


def test_commit_rejects_non_contiguous_head_dim():
    cfg = KVarNConfig(k_bits=4, v_bits=2, page_size=64, head_dim=64)
    k = torch.zeros(1, 64, 1, 128, dtype=torch.float16)[..., ::2]
    with pytest.raises(ValueError, match="Invalid stride of k"):
        commit_pages(k, k, cfg)


if __name__ == "__main__":
    test_commit_matches_reference(128, 4, 2, 128)
