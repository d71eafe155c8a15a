"""Paged-attention decode: one query token per sequence over its K/V in the paged cache.

One program handles one (sequence, KV head, split) and all the query heads
that share that KV head (GQA), so each K/V byte is read once; the heads are
padded to 16 rows so both products run on the tensor cores. Softmax is
online, in fp32, in the log2 domain. When the batch is too small to fill the
GPU, the context is split across programs (flash-decoding) and a second
kernel merges the partial results.

A float8 (e4m3) cache is read at half the bytes and widened to q's dtype in
registers; its scales cost nothing in the loop: k_scale folds into the softmax
scale, v_scale multiplies the output once.

Launch parameters come from `kernels.launch_table` (decided once, at load or
warm-up): no autotune wrapper sits on this hot path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.kv_cache import is_fp8_cache
from kernels.pdl import pdl_launch, wait_for_previous_kernel

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch parameters of the decode kernel: tokens per iteration, split count, warps, stages."""

    tokens: int = 64
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    scale_log2, v_scale,
    stride_q_tok, stride_q_head,
    stride_c_block, stride_c_tok, stride_c_head,
    stride_bt,
    stride_o_tok, stride_o_head,
    GROUP: tl.constexpr, QROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
    FP8_CACHE: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    chunks_per_split = tl.cdiv(tl.cdiv(seq_len, TOKENS), NUM_SPLITS)
    start = split * chunks_per_split * TOKENS
    end = tl.minimum(seq_len, start + chunks_per_split * TOKENS)

    # The GROUP query heads of this KV head, padded to QROWS (>= 16) rows so that
    # QK^T and PV run on the tensor cores; the padding costs no memory traffic.
    g = tl.arange(0, QROWS)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, TOKENS)
    q_heads = kv_head * GROUP + g
    head_mask = g < GROUP
    q = tl.load(q_ptr + seq * stride_q_tok + q_heads[:, None] * stride_q_head + d[None, :],
                mask=head_mask[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m = tl.full([QROWS], float("-inf"), tl.float32)
    l = tl.zeros([QROWS], tl.float32)
    acc = tl.zeros([QROWS, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    head_base = kv_head * stride_c_head
    for pos in range(start, end, TOKENS):
        tok = pos + t
        valid = tok < end
        block = tl.load(bt_row + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        off = block * stride_c_block + head_base + (tok % BLOCK_SIZE) * stride_c_tok
        k = tl.load(k_cache_ptr + off[None, :] + d[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if FP8_CACHE:
            k = k.to(q_ptr.dtype.element_ty)
            v = v.to(q_ptr.dtype.element_ty)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new

    if FP8_CACHE:
        acc = acc * v_scale
    if NUM_SPLITS == 1:
        l_safe = tl.where(l == 0.0, 1.0, l)  # an empty (padding) sequence yields zeros, not NaN
        out = acc / l_safe[:, None]
        tl.store(out_ptr + seq * stride_o_tok + q_heads[:, None] * stride_o_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        # partials: acc [seq, q_head, split, dim], (m, l) [seq, q_head, split, 2]
        row = (seq * (tl.num_programs(1) * GROUP) + q_heads) * NUM_SPLITS + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=head_mask[:, None])
        tl.store(part_ml_ptr + row * 2, m, mask=head_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l, mask=head_mask)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, stride_o_tok, stride_o_head,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS + s
    live = s < NUM_SPLITS
    m = tl.load(part_ml_ptr + row * 2, mask=live, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=live, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # an empty sequence: every split empty
    w = tl.exp2(m - m_max)  # empty splits have m = -inf and weigh nothing
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0)
    total = tl.sum(w * l, axis=0)
    total = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(w[:, None] * acc, axis=0) / total
    tl.store(out_ptr + seq * stride_o_tok + head * stride_o_head + d, out.to(out_ptr.dtype.element_ty))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    launch: DecodeLaunch = DecodeLaunch(),
    out: torch.Tensor | None = None,
    pdl: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """q [num_seqs, heads, head_dim]; caches [blocks, kv_heads, block_size, head_dim] in q's dtype or
    float8 e4m3 (holding K / k_scale and V / v_scale); block_tables [num_seqs, >= max blocks] int32;
    seq_lens [num_seqs] int32 (0 = padding row, output 0)."""
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, kv_heads, block_size, cache_dim = k_cache.shape
    fp8 = is_fp8_cache(k_cache)
    assert cache_dim == head_dim and v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype
    assert fp8 or q.dtype == k_cache.dtype, "q and cache dtypes differ"
    assert num_heads % kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert head_dim in (16, 32, 64, 128, 256), "head_dim must be a power of two in [16, 256]"
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dtype == torch.int32 and block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1
    assert seq_lens.dtype == torch.int32 and seq_lens.shape == (num_seqs,)
    assert launch.tokens % 16 == 0, "tokens per iteration must be a multiple of 16 (tensor-core tiles)"
    if out is None:
        out = torch.empty_like(q)
    group = num_heads // kv_heads
    splits = launch.num_splits
    if splits > 1:
        part_acc = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_seqs, num_heads, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    _paged_decode_kernel[(num_seqs, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_ml,
        scale * LOG2E * k_scale, v_scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(2), k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, QROWS=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TOKENS=launch.tokens, NUM_SPLITS=splits, IEEE=q.dtype == torch.float32,
        DOT_FP32=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1", FP8_CACHE=fp8,
        num_warps=launch.num_warps, num_stages=launch.num_stages, **pdl_launch(pdl, q),
    )
    if splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_acc, part_ml, out, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim, num_warps=4,
        )
    return out
