"""Sampling with top-k, top-p and min-p without a sort: an exponential race with rejection.

The sampler (engine.sampler.sample_rows) draws a row's token as the argmax of logit - log(noise)
over the tokens its filters keep (noise ~ Exp(1), one per token), and finds what they keep by
sorting the row. Here one program per row runs the race instead and rejects winners the filters
would have dropped: the winner c over the tokens still in play is kept when fewer than top_k
logits lie above it, their softmax mass is below top_p (of top-k's mass), and its probability is
at least min_p of the largest. Otherwise no token at or below c's logit is kept either (whatever
lies above already fills the quota), so the race goes on among the logits above c, with the same
noise: the result is the masked argmax's token, exactly. Each round is one pass over the row
(L2-resident) that measures the current winner and finds the next one in case it is rejected;
the row's largest logit is always kept, so the rounds end, usually after a few. Rows with both
top-k and top-p first find top-k's mass by a search for the k-th largest logit (sixteen keys a
pass, from a bracket below the largest logit, until exactly k are above the cut); the others never
search. Logits tied with the last kept one are all kept (a sort
keeps the ones it happens to order first).

Without filters it is the race alone, one pass over logits and noise (torch's draw takes a
softmax first). The CUDA decoder's sampling graphs take it, filtered or not, at the batch sizes
where it measures faster than torch's draw when they are captured (engine.sampler.
sampling_kernels); scripts/filtered_sampling_bench.py times the two on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # logits a program reads per iteration
PIVOTS = 16  # keys tested per pass of the k-th largest search: the range shrinks 16-fold a pass
PASSES = 9  # at most, after the bracket: 16^8 covers the 2^32 keys


@triton.jit
def _keys(x):
    """Order-preserving int32 keys of float32 values (negative floats have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _count_at_pivots(row_ptr, vocab, pivots, BLOCK: tl.constexpr):
    """How many of the row's logits have keys at or above each pivot key [PIVOTS] (as float32)."""
    count = tl.zeros(pivots.shape, tl.float32)
    for start in range(0, vocab, BLOCK):
        t = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + t, mask=t < vocab, other=float("-inf"))
        reach = (t < vocab)[:, None] & (_keys(x).to(tl.int64)[:, None] >= pivots[None, :])
        count += tl.sum(reach.to(tl.float32), axis=0)
    return count


@triton.jit
def _kth_largest_key(row_ptr, vocab, k, m, PIVOTS: tl.constexpr, PASSES: tl.constexpr, BLOCK: tl.constexpr):
    """A key K such that the logits with keys >= K are exactly the k largest (or, where the k-th
    largest is tied, those and its ties). The first pass brackets the k-th largest among values
    spaced geometrically below the row's largest logit m (m - (2^(j/2) - 1), up to m - 180), so
    for a small k the search starts within a narrow range; each further pass splits the bracket
    PIVOTS ways and the search ends as soon as the bracket's low end holds exactly k logits
    (random logits: two or three passes after the bracket, where a search over all 2^32 keys took
    eight)."""
    j = tl.arange(0, PIVOTS)
    pivots = _keys(m - (tl.exp2(j.to(tl.float32) * 0.5) - 1.0)).to(tl.int64)  # descending
    count = _count_at_pivots(row_ptr, vocab, pivots, BLOCK)
    ok = count >= k
    # lo: the highest pivot at least k logits reach (the lowest key when none does); hi: the
    # lowest pivot fewer than k reach (pivot 0, m itself, is reached by one logit at least).
    lo = tl.max(tl.where(ok, pivots, -(2**31)), axis=0)
    hi = tl.min(tl.where(~ok, pivots, 2**31), axis=0)
    at_lo = tl.min(tl.where(ok, count, 3.0e38), axis=0)  # (none reached: not exactly k)
    passes = 0
    while (at_lo != k) & (hi - lo > 1) & (passes < PASSES):
        step = tl.maximum((hi - lo + PIVOTS - 1) // PIVOTS, 1)
        pivots = lo + j.to(tl.int64) * step
        in_range = pivots < hi
        count = _count_at_pivots(row_ptr, vocab, pivots, BLOCK)
        ok = in_range & (count >= k)
        lo = tl.max(tl.where(ok, pivots, lo), axis=0)
        hi = tl.min(tl.where(in_range & ~ok, pivots, hi), axis=0)
        at_lo = tl.min(tl.where(ok, count, at_lo), axis=0)
        passes += 1
    return lo


@triton.jit
def _race_update(score, start, best, best_idx):
    """The race's running winner (its score and index) after a block of scores starting at `start`
    (the earlier one on ties, as torch's argmax)."""
    block_best = tl.max(score, axis=0)
    block_idx = start + tl.argmax(score, axis=0)
    take = block_best > best
    return tl.where(take, block_best, best), tl.where(take, block_idx.to(tl.int64), best_idx)


@triton.jit
def _filtered_sample_kernel(logits_ptr, noise_ptr, top_k_ptr, top_p_ptr, min_p_ptr, out_ptr, vocab,
                            stride_logits, stride_noise,
                            BLOCK: tl.constexpr, PIVOTS: tl.constexpr, PASSES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits
    noise_row = noise_ptr + row * stride_noise
    k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    # One pass: the largest logit m, the softmax denominator z (rescaled online; -inf logits, a
    # grammar's mask, add nothing) and the race's winner over the whole row.
    m = tl.full([], float("-inf"), tl.float32)
    z = tl.zeros([], tl.float32)
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.zeros([], tl.int64)
    for start in range(0, vocab, BLOCK):
        t = start + tl.arange(0, BLOCK)
        valid = t < vocab
        x = tl.load(row_ptr + t, mask=valid, other=float("-inf"))
        e = tl.load(noise_row + t, mask=valid, other=1.0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
        best, best_idx = _race_update(x - tl.log(e), start, best, best_idx)
    # top-p's denominator: the mass top-k keeps (all of it without top-k).
    z_kept = z
    if (k < vocab) & (top_p < 1.0):
        kth = _kth_largest_key(row_ptr, vocab, k.to(tl.float32), m, PIVOTS, PASSES, BLOCK)
        z_kept = tl.zeros([], tl.float32)
        for start in range(0, vocab, BLOCK):
            t = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + t, mask=t < vocab, other=float("-inf"))
            z_kept += tl.sum(tl.where(_keys(x).to(tl.int64) >= kth, tl.exp(x - m), 0.0), axis=0)
    # Rounds: measure the winner (logits above it: how many, what mass) and, in the same pass,
    # find the winner among those above it, the next candidate if this one is rejected.
    cand = tl.load(row_ptr + best_idx)
    cand_idx = best_idx
    rejected = (k < vocab) | (top_p < 1.0) | (min_p > 0.0)  # a row without filters keeps its winner
    while rejected:
        above = tl.zeros([], tl.float32)
        mass = tl.zeros([], tl.float32)
        nxt = tl.full([], float("-inf"), tl.float32)
        nxt_idx = cand_idx
        for start in range(0, vocab, BLOCK):
            t = start + tl.arange(0, BLOCK)
            valid = t < vocab
            x = tl.load(row_ptr + t, mask=valid, other=float("-inf"))
            e = tl.load(noise_row + t, mask=valid, other=1.0)
            higher = valid & (x > cand)
            above += tl.sum(higher.to(tl.float32), axis=0)
            mass += tl.sum(tl.where(higher, tl.exp(x - m), 0.0), axis=0)
            nxt, nxt_idx = _race_update(tl.where(higher, x - tl.log(e), float("-inf")), start, nxt, nxt_idx)
        rejected = (above >= k) | (mass >= top_p * z_kept) | (tl.exp(cand - m) < min_p)
        cand_idx = tl.where(rejected, nxt_idx, cand_idx)
        cand = tl.load(row_ptr + cand_idx)
    tl.store(out_ptr + row, cand_idx)


def filtered_sample(logits: torch.Tensor, noise: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's token [rows] int64: the argmax of logits - log(noise) over the tokens that top-k
    (>= vocab: none), then top-p on the softmax of what top-k kept (>= 1: none), and min-p (of the
    largest probability; 0: none) keep. logits and noise [rows, vocab] float32 (unit stride along
    the vocabulary; noise > 0), top_k [rows] int64 (>= 1), top_p [rows] float32 in (0, 1], min_p
    [rows] float32 in [0, 1]."""
    rows, vocab = logits.shape
    assert logits.dtype == noise.dtype == torch.float32 and logits.stride(1) == noise.stride(1) == 1
    assert noise.shape == logits.shape and top_k.shape == top_p.shape == min_p.shape == (rows,)
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows:
        _filtered_sample_kernel[(rows,)](logits, noise, top_k, top_p, min_p, out, vocab, logits.stride(0), noise.stride(0),
                                         BLOCK=BLOCK, PIVOTS=PIVOTS, PASSES=PASSES, num_warps=8)
    return out
