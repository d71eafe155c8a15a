"""Top-k and top-p without a sort: each row's smallest kept logit, found by a radix-16 search.

The sampler's cut (engine.sampler.sample_rows) sorts every row of [rows, vocab] logits, and a
segmented sort of a few long rows is most of what a sampled decode step adds on the device. Here
one program per row searches the logits' order-preserving int32 keys instead: first the k-th
largest logit (the largest key that at least k logits reach), then top-p's cut among the logits
top-k kept (the largest key at which their softmax mass still reaches top_p). Each pass over the
row (L2-resident: 200 KB for a 50k vocabulary) tests 16 keys spread over the remaining range, so
eight passes pin a 32-bit key exactly. The cut is the sort's, except that logits tied with the
last kept one are all kept (the sort keeps the ones it happens to order first).

The CUDA decoder's sampling graphs take it at the batch sizes where it measures faster than the
sort when they are captured (engine.sampler.filter_cutoff); scripts/sampling_cutoff_bench.py times
the two on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # logits a program reads per iteration
PIVOTS = 16  # keys tested per pass: the range shrinks 16-fold a pass
PASSES = 9  # 16^8 covers the 2^32 keys; one pass more costs nothing once the range is a single key


@triton.jit
def _keys(x):
    """Order-preserving int32 keys of float32 values (negative floats have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _search(row_ptr, vocab, lo, hi, floor_key, m, target, MASS: tl.constexpr, BLOCK: tl.constexpr,
            PIVOTS: tl.constexpr, PASSES: tl.constexpr):
    """The largest key K in [lo, hi) whose logits at or above it (and at or above `floor_key`) number
    at least `target` (MASS False) or hold at least `target` of exp(logit - m) (MASS True); `lo`
    must qualify, `hi` not."""
    j = tl.arange(0, PIVOTS).to(tl.int64)
    for _ in range(PASSES):
        step = tl.maximum((hi - lo + PIVOTS - 1) // PIVOTS, 1)
        pivots = lo + j * step
        in_range = pivots < hi
        total = tl.zeros([PIVOTS], tl.float32)
        for start in range(0, vocab, BLOCK):
            t = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + t, mask=t < vocab, other=float("-inf"))
            key = _keys(x).to(tl.int64)
            live = (t < vocab) & (key >= floor_key)
            reach = live[:, None] & (key[:, None] >= pivots[None, :])
            if MASS:
                weight = tl.exp(x - m)
            else:
                weight = tl.full([BLOCK], 1.0, tl.float32)
            total += tl.sum(tl.where(reach, weight[:, None], 0.0), axis=0)
        ok = in_range & (total >= target)
        lo = tl.max(tl.where(ok, pivots, lo), axis=0)
        hi = tl.min(tl.where(in_range & ~ok, pivots, hi), axis=0)
    return lo


@triton.jit
def _cutoff_kernel(logits_ptr, top_k_ptr, top_p_ptr, out_ptr, vocab, stride_row,
                   BLOCK: tl.constexpr, PIVOTS: tl.constexpr, PASSES: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    # The row's largest and smallest keys, and its largest logit (the softmax's shift).
    key_max = tl.full([], -(2**31), tl.int64)
    key_min = tl.full([], 2**31 - 1, tl.int64)
    m = tl.full([], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        t = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + t, mask=t < vocab, other=float("-inf"))
        key = _keys(x).to(tl.int64)
        key_max = tl.maximum(key_max, tl.max(tl.where(t < vocab, key, -(2**31)), axis=0))
        key_min = tl.minimum(key_min, tl.min(tl.where(t < vocab, key, 2**31 - 1), axis=0))
        m = tl.maximum(m, tl.max(x, axis=0))
    cut = key_min  # keep everything
    if k < vocab:
        cut = _search(row_ptr, vocab, key_min, key_max + 1, key_min, m, k.to(tl.float32), False,
                      BLOCK, PIVOTS, PASSES)
    if top_p < 1.0:
        z = tl.zeros([], tl.float32)  # the kept logits' softmax denominator
        for start in range(0, vocab, BLOCK):
            t = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + t, mask=t < vocab, other=float("-inf"))
            z += tl.sum(tl.where((t < vocab) & (_keys(x).to(tl.int64) >= cut), tl.exp(x - m), 0.0), axis=0)
        cut = _search(row_ptr, vocab, cut, key_max + 1, cut, m, top_p * z, True, BLOCK, PIVOTS, PASSES)
    bits = tl.where(cut >= 0, cut, cut ^ 0x7FFFFFFF).to(tl.int32)
    tl.store(out_ptr + row, bits.to(tl.float32, bitcast=True))


def topk_topp_cutoff(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's smallest kept logit [rows] float32: logits [rows, vocab] float32 (unit stride
    along the vocabulary) keep those >= it. top_k [rows] int (>= vocab: no cut) first; then top_p
    [rows] float (>= 1: no cut) on the softmax of what top-k kept: the fewest largest logits whose
    mass reaches top_p, and every logit tied with the last of them."""
    rows, vocab = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    assert top_k.shape == (rows,) and top_p.shape == (rows,)
    if out is None:
        out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _cutoff_kernel[(rows,)](logits, top_k, top_p.float(), out, vocab, logits.stride(0),
                                BLOCK=BLOCK, PIVOTS=PIVOTS, PASSES=PASSES, num_warps=8)
    return out
