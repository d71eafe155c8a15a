"""Causal attention for prefill chunks over the paged cache (varlen, any cached prefix).

Each sequence contributes its q_len newest tokens (positions seq_len - q_len
.. seq_len - 1); their K/V were already stored by `write_kv`, so a chunk of a
long prompt, or a prompt whose first blocks came from the prefix cache, reads
everything through the block table, with no gather copies.

Programs walk a tile list, one (sequence, block of BLOCK_M query rows) per
entry and -1 for none (`prefill_tiles`), rather than a grid over sequences x
the longest query: the grid then depends only on the token count and the
sequence slots, so a step of any mix of prompt chunks and decodes replays one
CUDA graph captured for its token bucket, and no program idles on a short
sequence's empty row blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from roseinfer_kernels.kv_cache import is_fp8_cache
from roseinfer_kernels.paged_attention import LOG2E
from roseinfer_kernels.prefill_tiles import TILE_SEQ_SHIFT


@dataclass(frozen=True)
class PrefillLaunch:
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, tiles_ptr, out_ptr,
    scale_log2, v_scale,
    stride_q_tok, stride_q_head,
    stride_c_block, stride_c_tok, stride_c_head,
    stride_bt,
    stride_o_tok, stride_o_head,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, DOT_FP32: tl.constexpr,
    TILE_SEQ_SHIFT: tl.constexpr, FP8_CACHE: tl.constexpr,
):
    tile = tl.load(tiles_ptr + tl.program_id(0))
    head = tl.program_id(1)
    if tile >= 0:
        seq = tile >> TILE_SEQ_SHIFT
        m_block = tile & ((1 << TILE_SEQ_SHIFT) - 1)
        q_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        first_pos = seq_len - q_len
        kv_head = head // GROUP
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < q_len
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_q_tok + head * stride_q_head + d[None, :],
                    mask=row_valid[:, None], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        q_pos = first_pos + rows
        kv_end = tl.minimum(seq_len, first_pos + (m_block + 1) * BLOCK_M)

        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        bt_row = block_tables_ptr + seq * stride_bt
        for n_start in range(0, kv_end, BLOCK_N):
            cols = n_start + tl.arange(0, BLOCK_N)
            col_valid = cols < kv_end
            block = tl.load(bt_row + cols // BLOCK_SIZE, mask=col_valid, other=0).to(tl.int64)
            off = block * stride_c_block + (cols % BLOCK_SIZE) * stride_c_tok + kv_head * stride_c_head
            k = tl.load(k_cache_ptr + off[None, :] + d[:, None], mask=col_valid[None, :], other=0.0)
            if FP8_CACHE:
                k = k.to(q_ptr.dtype.element_ty)
            if DOT_FP32:
                k = k.to(tl.float32)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee")
            else:
                s = tl.dot(q, k)
            s = s * scale_log2
            visible = (cols[None, :] <= q_pos[:, None]) & col_valid[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(v_cache_ptr + off[:, None] + d[None, :], mask=col_valid[:, None], other=0.0)
            if FP8_CACHE:
                v = v.to(q_ptr.dtype.element_ty)
            if DOT_FP32:
                v = v.to(tl.float32)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / l[:, None]
        if FP8_CACHE:
            out = out * v_scale
        tl.store(out_ptr + (q_start + rows)[:, None] * stride_o_tok + head * stride_o_head + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    tiles: torch.Tensor,
    launch: PrefillLaunch = PrefillLaunch(),
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """q [num_tokens, heads, head_dim] (sequences packed by query_start_loc [num_seqs + 1] int32);
    `tiles` int32 from `prefill_tiles` with the same `launch.block_m` (entries -1 do nothing). The
    caches are in q's dtype or float8 e4m3 (K / k_scale, V / v_scale; see roseinfer_kernels.paged_attention)."""
    num_tokens, num_heads, head_dim = q.shape
    _, kv_heads, block_size, cache_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert cache_dim == head_dim and v_cache.shape == k_cache.shape
    fp8 = is_fp8_cache(k_cache)
    assert k_cache.dtype == v_cache.dtype and (fp8 or q.dtype == k_cache.dtype)
    assert num_heads % kv_heads == 0 and head_dim in (16, 32, 64, 128, 256)
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dtype == torch.int32 and block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1
    assert seq_lens.dtype == torch.int32 and query_start_loc.dtype == torch.int32
    assert query_start_loc.shape == (num_seqs + 1,)
    assert tiles.dtype == torch.int32 and tiles.dim() == 1
    if out is None:
        out = torch.empty_like(q)
    _paged_prefill_kernel[(tiles.shape[0], num_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, tiles, out,
        scale * LOG2E * k_scale, v_scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(2), k_cache.stride(1),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, IEEE=q.dtype == torch.float32,
        # Triton's CPU interpreter computes bf16 tl.dot wrongly (seen with triton 3.9): upcast there only.
        DOT_FP32=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        TILE_SEQ_SHIFT=TILE_SEQ_SHIFT, FP8_CACHE=fp8, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out
