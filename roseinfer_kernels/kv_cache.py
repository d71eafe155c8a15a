"""Store this step's K/V into the paged cache at the slot mapping (one program per token).

A float8 (e4m3) cache stores K / k_scale and V / v_scale, rounded to nearest and clamped to
e4m3's +-448 (past it a cast would give NaN); the attention kernels multiply the scales back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from roseinfer_kernels import fp8
from roseinfer_kernels.pdl import pdl_launch, wait_for_previous_kernel

FP8_MAX = tl.constexpr(fp8.FP8_MAX)  # a global the kernels may read


@triton.jit
def to_fp8(x, inv_scale, fp8_dtype: tl.constexpr):
    """x / scale, clamped to e4m3's range, as `fp8_dtype` (round to nearest even)."""
    x = x.to(tl.float32) * inv_scale
    return tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX).to(fp8_dtype)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_k_tok, stride_v_tok, stride_c_block, stride_c_head, stride_c_tok, inv_k_scale, inv_v_scale,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, ROW: tl.constexpr, ROW_PAD: tl.constexpr,
    FP8_CACHE: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)  # every program, also those with nothing to store (roseinfer_kernels/pdl.py)
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:  # negative slots pad a CUDA-graph batch: nothing to store
        i = tl.arange(0, ROW_PAD)
        mask = i < ROW
        dst = (slot // BLOCK_SIZE) * stride_c_block + (i // HEAD_DIM) * stride_c_head + (slot % BLOCK_SIZE) * stride_c_tok + i % HEAD_DIM
        k = tl.load(k_ptr + tok * stride_k_tok + i, mask=mask)
        v = tl.load(v_ptr + tok * stride_v_tok + i, mask=mask)
        if FP8_CACHE:
            k = to_fp8(k, inv_k_scale, k_cache_ptr.dtype.element_ty)
            v = to_fp8(v, inv_v_scale, v_cache_ptr.dtype.element_ty)
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             pdl: bool = False, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k, v: [num_tokens, kv_heads, head_dim], each token's heads contiguous; caches [blocks, kv_heads, block_size, head_dim]
    in k's dtype, or float8 e4m3 (then K / k_scale and V / v_scale are stored)."""
    num_tokens, kv_heads, head_dim = k.shape
    fp8 = is_fp8_cache(k_cache)
    assert v.shape == k.shape and k.dtype == v.dtype and k_cache.dtype == v_cache.dtype and (fp8 or k_cache.dtype == k.dtype)
    assert k_cache.shape == v_cache.shape and k_cache.shape[1] == kv_heads and k_cache.shape[3] == head_dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k.stride(2) == 1 and k.stride(1) == head_dim and v.stride(2) == 1 and v.stride(1) == head_dim
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64)
    if num_tokens == 0:
        return
    row = kv_heads * head_dim
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), 1.0 / k_scale, 1.0 / v_scale,
        BLOCK_SIZE=k_cache.shape[2], HEAD_DIM=head_dim, ROW=row, ROW_PAD=triton.next_power_of_2(row), FP8_CACHE=fp8,
        num_warps=4,
        **pdl_launch(pdl, k),
    )


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.float8_e4m3fn
