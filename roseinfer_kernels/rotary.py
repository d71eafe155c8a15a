"""Rotary position embedding (HF's rotate-half form) fused with the KV-cache write: the query heads
rotated in place, the rotated keys and the values stored straight into the paged cache. One launch
for what torch does in about a dozen, and one fewer than RoPE and the cache write apart.

Head h of token t holds [x1, x2] (two halves of head_dim); with the angle table of position p,
it becomes [x1 cos - x2 sin, x2 cos + x1 sin]. Math is fp32; the tables are read in their own
dtype (the model's, as HF casts them before use).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from roseinfer_kernels.kv_cache import is_fp8_cache, to_fp8
from roseinfer_kernels.pdl import pdl_launch, wait_for_previous_kernel


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    stride_q_tok, stride_k_tok, stride_v_tok, stride_table, stride_c_block, stride_c_head, stride_c_tok,
    num_heads, num_kv_heads, inv_k_scale, inv_v_scale,
    HALF: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    FP8_CACHE: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + pos * stride_table + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_table + d).to(tl.float32)
    dtype = q_ptr.dtype.element_ty
    # Query heads: rotated in place (attention reads them next).
    h = tl.arange(0, HEADS_PAD)[:, None]
    mask = h < num_heads
    q = q_ptr + tok * stride_q_tok + h * (2 * HALF)
    x1 = tl.load(q + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(q + HALF + d, mask=mask, other=0.0).to(tl.float32)
    tl.store(q + d, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(q + HALF + d, (x2 * cos + x1 * sin).to(dtype), mask=mask)
    # Key heads rotated and value heads as they are, straight into the paged cache.
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:  # negative slots pad a CUDA-graph batch: nothing to store
        kh = tl.arange(0, KV_HEADS_PAD)[:, None]
        kv_mask = kh < num_kv_heads
        dst = (slot // BLOCK_SIZE) * stride_c_block + kh * stride_c_head + (slot % BLOCK_SIZE) * stride_c_tok
        k = k_ptr + tok * stride_k_tok + kh * (2 * HALF)
        k1 = tl.load(k + d, mask=kv_mask, other=0.0).to(tl.float32)  # new names: the compiler wants
        k2 = tl.load(k + HALF + d, mask=kv_mask, other=0.0).to(tl.float32)  # one shape per variable
        cache_dtype = k_cache_ptr.dtype.element_ty
        k1r = (k1 * cos - k2 * sin).to(dtype)  # rounded to the model dtype first, as the unfused path is
        k2r = (k2 * cos + k1 * sin).to(dtype)
        dd = tl.arange(0, 2 * HALF)[None, :]
        v = tl.load(v_ptr + tok * stride_v_tok + kh * (2 * HALF) + dd, mask=kv_mask)
        if FP8_CACHE:
            tl.store(k_cache_ptr + dst + d, to_fp8(k1r, inv_k_scale, cache_dtype), mask=kv_mask)
            tl.store(k_cache_ptr + dst + HALF + d, to_fp8(k2r, inv_k_scale, cache_dtype), mask=kv_mask)
            tl.store(v_cache_ptr + dst + dd, to_fp8(v, inv_v_scale, cache_dtype), mask=kv_mask)
        else:
            tl.store(k_cache_ptr + dst + d, k1r.to(cache_dtype), mask=kv_mask)
            tl.store(k_cache_ptr + dst + HALF + d, k2r.to(cache_dtype), mask=kv_mask)
            tl.store(v_cache_ptr + dst + dd, v, mask=kv_mask)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    pdl: bool = False, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """RoPE and the KV-cache write in one launch: q [tokens, heads, head_dim] is rotated in place;
    k rotated and v as is are stored at `slot_mapping` (negative: skipped) in the caches
    [blocks, kv_heads, block_size, head_dim]; k and v themselves are left unchanged. q, k, v may
    be strided views of a fused qkv row (heads contiguous). A float8 cache stores K / k_scale and
    V / v_scale (roseinfer_kernels.kv_cache). Returns q."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    assert k.shape == v.shape == (tokens, kv_heads, head_dim) and q.dtype == k.dtype == v.dtype
    assert all(t.stride(2) == 1 and t.stride(1) == head_dim for t in (q, k, v)), "heads must be contiguous"
    assert head_dim in (16, 32, 64, 128, 256), "head_dim must be a power of two in [16, 256]"
    assert k_cache.shape == v_cache.shape and k_cache.shape[1] == kv_heads and k_cache.shape[3] == head_dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert cos.shape == sin.shape and cos.shape[1] == head_dim // 2 and cos.stride() == sin.stride() and cos.stride(1) == 1
    assert positions.shape == (tokens,) and slot_mapping.shape == (tokens,)
    if tokens == 0:
        return q
    _rotary_write_kv_kernel[(tokens,)](
        q, k, v, positions, cos, sin, slot_mapping, k_cache, v_cache,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        heads, kv_heads, 1.0 / k_scale, 1.0 / v_scale,
        HALF=head_dim // 2, HEADS_PAD=triton.next_power_of_2(heads), KV_HEADS_PAD=triton.next_power_of_2(kv_heads),
        BLOCK_SIZE=k_cache.shape[2], FP8_CACHE=is_fp8_cache(k_cache), num_warps=4, **pdl_launch(pdl, q),
    )
    return q
