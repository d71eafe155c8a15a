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

Launch parameters come from `roseinfer_kernels.launch_table` (decided once, at load or
warm-up): no autotune wrapper sits on this hot path.

`cascade_decode` is the same attention for a batch that shares a prompt prefix in
the same cache blocks: the prefix is read once per KV head for every query (a
second kernel), the paged kernel covers each sequence's remainder, and the
merge joins them as splits. The prefix's length is read from device memory, so
one captured graph serves every run (the engine's greedy decode graphs, see
engine/model_runner.py); scripts/decode_attention_bw.py measures it against
paged_decode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from roseinfer_kernels.fp8_rows import INTERPRETED
from roseinfer_kernels.kv_cache import is_fp8_cache
from roseinfer_kernels.linear import widen_e4m3
from roseinfer_kernels.pdl import pdl_launch, wait_for_previous_kernel

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch parameters of the decode kernel: tokens per iteration, split count, warps, stages."""

    tokens: int = 64
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _widened(t, DTYPE: tl.constexpr):
    """e4m3 cache values in DTYPE. fp16: one conversion instruction for two values (cvt
    e4m3x2 -> f16x2; every e4m3 value is exact in fp16). bf16 on the GPU: linear.widen_e4m3 (integer
    ops and a packed FMA per two values; `.to` compiles e4m3 -> f16 -> f32 -> bf16 conversions).
    Else a conversion."""
    if not INTERPRETED and DTYPE == tl.bfloat16:
        return widen_e4m3(t, DTYPE)
    return t.to(DTYPE)


@triton.jit
def _attend_range(q, table_ptr, start, end, k_cache_ptr, v_cache_ptr, head_base, stride_c_block, stride_c_tok,
                  scale_log2, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  TOKENS: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr, FP8_CACHE: tl.constexpr):
    """The query rows q [ROWS, HEAD_DIM] against cached tokens start..end of one KV head (`table_ptr`:
    the block ids; `head_base`: the head's offset in a block), TOKENS at a time, online softmax in
    the log2 domain; returns (m, l, acc), unnormalised, for the caller to finish or merge."""
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, TOKENS)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    if FP8_CACHE and not INTERPRETED and q.dtype == tl.bfloat16:
        # An e4m3 cache on the GPU: the dots in fp16 for a bf16 model too. bf16's K and V cost ~3
        # integer instructions a value to widen (_widened), fp16's one conversion per two, and the
        # loop over an e4m3 cache is bound by instruction issue (the 8B at batch 64, context 3840:
        # 2.3 TB/s against the bf16 cache's 4.2 on the H200). fp16 holds bf16 queries to more
        # mantissa bits; beyond its range they are clamped (queries are far smaller).
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    for pos in range(start, end, TOKENS):
        tok = pos + t
        valid = tok < end
        block = tl.load(table_ptr + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        off = block * stride_c_block + head_base + (tok % BLOCK_SIZE) * stride_c_tok
        k = tl.load(k_cache_ptr + off[None, :] + d[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if FP8_CACHE:  # widened to q's dtype (fp32 where DOT_FP32 has widened q)
            k = _widened(k, q.dtype)
            v = _widened(v, q.dtype)
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
    return m, l, acc


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    scale_log2, v_scale, skip,
    stride_q_tok, stride_q_head,
    stride_c_block, stride_c_tok, stride_c_head,
    stride_bt,
    stride_o_tok, stride_o_head,
    GROUP: tl.constexpr, QROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
    FP8_CACHE: tl.constexpr, USE_PDL: tl.constexpr, SPLIT_BASE: tl.constexpr = 0,
    SKIP_IN_MEMORY: tl.constexpr = False, MERGE_PREFIX: tl.constexpr = False,
):
    # `skip` > 0 (cascade_decode): the first `skip` tokens are the shared prefix, which another
    # kernel attends to; this one covers the rest and writes its partials after that kernel's
    # (split slots SPLIT_BASE.. of NUM_SPLITS + SPLIT_BASE), or, MERGE_PREFIX (one split), folds
    # that kernel's partial (slot 0) into its own and writes the output. SKIP_IN_MEMORY: `skip`
    # points to the prefix length.
    wait_for_previous_kernel(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if SKIP_IN_MEMORY:
        skipped = tl.load(skip)
    else:
        skipped = skip
    seq_len = tl.load(seq_lens_ptr + seq)
    chunks_per_split = tl.cdiv(tl.cdiv(tl.maximum(seq_len - skipped, 0), TOKENS), NUM_SPLITS)
    start = skipped + split * chunks_per_split * TOKENS
    end = tl.minimum(seq_len, start + chunks_per_split * TOKENS)

    # The GROUP query heads of this KV head, padded to QROWS (>= 16) rows so that
    # QK^T and PV run on the tensor cores; the padding costs no memory traffic.
    g = tl.arange(0, QROWS)
    d = tl.arange(0, HEAD_DIM)
    q_heads = kv_head * GROUP + g
    head_mask = g < GROUP
    q = tl.load(q_ptr + seq * stride_q_tok + q_heads[:, None] * stride_q_head + d[None, :],
                mask=head_mask[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m, l, acc = _attend_range(q, block_tables_ptr + seq * stride_bt, start, end, k_cache_ptr, v_cache_ptr,
                              kv_head * stride_c_head, stride_c_block, stride_c_tok, scale_log2,
                              QROWS, HEAD_DIM, BLOCK_SIZE, TOKENS, IEEE, DOT_FP32, FP8_CACHE)

    if FP8_CACHE:
        acc = acc * v_scale
    if NUM_SPLITS == 1 and SPLIT_BASE == 0:
        l_safe = tl.where(l == 0.0, 1.0, l)  # an empty (padding) sequence yields zeros, not NaN
        out = acc / l_safe[:, None]
        tl.store(out_ptr + seq * stride_o_tok + q_heads[:, None] * stride_o_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    elif MERGE_PREFIX:
        row = seq * (tl.num_programs(1) * GROUP) + q_heads
        m_prefix = tl.load(part_ml_ptr + row * 2, mask=head_mask, other=float("-inf"))
        l_prefix = tl.load(part_ml_ptr + row * 2 + 1, mask=head_mask, other=0.0)
        acc_prefix = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=head_mask[:, None], other=0.0)
        m_max = tl.maximum(m, m_prefix)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # a padding row: both parts empty
        w, w_prefix = tl.exp2(m - m_max), tl.exp2(m_prefix - m_max)
        total = l * w + l_prefix * w_prefix
        total = tl.where(total == 0.0, 1.0, total)
        out = (acc * w[:, None] + acc_prefix * w_prefix[:, None]) / total[:, None]
        tl.store(out_ptr + seq * stride_o_tok + q_heads[:, None] * stride_o_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        # partials: acc [seq, q_head, split, dim], (m, l) [seq, q_head, split, 2]
        row = (seq * (tl.num_programs(1) * GROUP) + q_heads) * (NUM_SPLITS + SPLIT_BASE) + SPLIT_BASE + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=head_mask[:, None])
        tl.store(part_ml_ptr + row * 2, m, mask=head_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l, mask=head_mask)


@triton.jit
def _shared_prefix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, prefix_table_ptr, seq_lens_ptr, part_acc_ptr, part_ml_ptr,
    num_rows, prefix_len_ptr, scale_log2, v_scale,
    stride_q_tok, stride_q_head,
    stride_c_block, stride_c_tok, stride_c_head,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
    TOKENS: tl.constexpr, TOTAL_SPLITS: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
    FP8_CACHE: tl.constexpr,
):
    """cascade_decode's first part: every sequence's query heads of one KV head (BLOCK_Q rows of
    (sequence, head) pairs) against the shared prefix's K/V, read once for all of them; partials
    into split slot 0. Rows of padding sequences (length 0) stay empty."""
    kv_head = tl.program_id(0)
    prefix_len = tl.load(prefix_len_ptr)
    r = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_rows = r < num_rows
    seq = r // GROUP
    head = kv_head * GROUP + r % GROUP
    live = in_rows & (tl.load(seq_lens_ptr + seq, mask=in_rows, other=0) > 0)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq[:, None] * stride_q_tok + head[:, None] * stride_q_head + d[None, :],
                mask=live[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m, l, acc = _attend_range(q, prefix_table_ptr, 0, prefix_len, k_cache_ptr, v_cache_ptr, kv_head * stride_c_head,
                              stride_c_block, stride_c_tok, scale_log2, BLOCK_Q, HEAD_DIM, BLOCK_SIZE, TOKENS,
                              IEEE, DOT_FP32, FP8_CACHE)
    if FP8_CACHE:
        acc = acc * v_scale
    m = tl.where(live, m, float("-inf"))  # padding rows: nothing attended (the merge gives zeros)
    l = tl.where(live, l, 0.0)
    row = (seq * (tl.num_programs(0) * GROUP) + head) * TOTAL_SPLITS
    tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=in_rows[:, None])
    tl.store(part_ml_ptr + row * 2, m, mask=in_rows)
    tl.store(part_ml_ptr + row * 2 + 1, l, mask=in_rows)


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
        scale * LOG2E * k_scale, v_scale, 0,
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


@dataclass(frozen=True)
class PrefixLaunch:
    """Launch parameters of cascade_decode's shared-prefix kernel: (sequence, head) rows a program,
    prefix tokens an iteration, warps, stages."""

    block_q: int = 64
    tokens: int = 64
    num_warps: int = 4
    num_stages: int = 2


def cascade_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    prefix_len: torch.Tensor,
    launch: DecodeLaunch = DecodeLaunch(),
    prefix_launch: PrefixLaunch = PrefixLaunch(),
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """paged_decode for a batch whose sequences all begin with the same `prefix_len` tokens in the
    same cache blocks (a shared system prompt left by the prefix cache): `prefix_len` is an int32
    tensor [1] on the device, read by the kernels (a captured graph replays with each run's), a
    multiple of the block size, shorter than every live sequence, 0 for none; every live row of
    `block_tables` starts with the same prefix_len / block_size block ids as row 0. The prefix's
    K/V are read once per KV head for all the batch's queries, as a [rows, tokens] product on the
    tensor cores, instead of once per sequence; each sequence's remainder goes through the paged
    kernel (its `launch.num_splits` splits); the parts merge as flash-decoding splits do, inside
    the paged kernel when it runs one split (a launch fewer)."""
    num_seqs, num_heads, head_dim = q.shape
    _, kv_heads, block_size, _ = k_cache.shape
    assert prefix_len.dtype == torch.int32 and prefix_len.numel() == 1 and prefix_len.device == q.device
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1 and q.stride(2) == 1
    if out is None:
        out = torch.empty_like(q)
    group = num_heads // kv_heads
    merge_in_place = launch.num_splits == 1
    total = 1 if merge_in_place else launch.num_splits + 1  # partial slots: the prefix's, then the splits'
    part_acc = torch.empty(num_seqs, num_heads, total, head_dim, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(num_seqs, num_heads, total, 2, dtype=torch.float32, device=q.device)
    fp8 = is_fp8_cache(k_cache)
    interpret_bf16 = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    rows = num_seqs * group
    _shared_prefix_kernel[(kv_heads, triton.cdiv(rows, prefix_launch.block_q))](
        q, k_cache, v_cache, block_tables[0], seq_lens, part_acc, part_ml,
        rows, prefix_len, scale * LOG2E * k_scale, v_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(2), k_cache.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_Q=prefix_launch.block_q,
        TOKENS=prefix_launch.tokens, TOTAL_SPLITS=total, IEEE=q.dtype == torch.float32, DOT_FP32=interpret_bf16,
        FP8_CACHE=fp8, num_warps=prefix_launch.num_warps, num_stages=prefix_launch.num_stages,
    )
    _paged_decode_kernel[(num_seqs, kv_heads, launch.num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_ml,
        scale * LOG2E * k_scale, v_scale, prefix_len,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(2), k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, QROWS=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TOKENS=launch.tokens, NUM_SPLITS=launch.num_splits, IEEE=q.dtype == torch.float32, DOT_FP32=interpret_bf16,
        FP8_CACHE=fp8, USE_PDL=False, SPLIT_BASE=1, SKIP_IN_MEMORY=True, MERGE_PREFIX=merge_in_place,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if not merge_in_place:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_acc, part_ml, out, out.stride(0), out.stride(1),
            NUM_SPLITS=total, SPLITS_PAD=triton.next_power_of_2(total), HEAD_DIM=head_dim, num_warps=4,
        )
    return out
