"""Store this step's K/V into the paged cache at the slot mapping (one program per token)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, wait_for_previous_kernel


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_k_tok, stride_v_tok, stride_c_block, stride_c_head, stride_c_tok,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, ROW: tl.constexpr, ROW_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)  # every program, also those with nothing to store (kernels/pdl.py)
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:  # negative slots pad a CUDA-graph batch: nothing to store
        i = tl.arange(0, ROW_PAD)
        mask = i < ROW
        dst = (slot // BLOCK_SIZE) * stride_c_block + (i // HEAD_DIM) * stride_c_head + (slot % BLOCK_SIZE) * stride_c_tok + i % HEAD_DIM
        k = tl.load(k_ptr + tok * stride_k_tok + i, mask=mask)
        v = tl.load(v_ptr + tok * stride_v_tok + i, mask=mask)
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
             pdl: bool = False) -> None:
    """k, v: [num_tokens, kv_heads, head_dim], each token's heads contiguous; caches [blocks, kv_heads, block_size, head_dim]."""
    num_tokens, kv_heads, head_dim = k.shape
    assert v.shape == k.shape and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
    assert k_cache.shape == v_cache.shape and k_cache.shape[1] == kv_heads and k_cache.shape[3] == head_dim
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k.stride(2) == 1 and k.stride(1) == head_dim and v.stride(2) == 1 and v.stride(1) == head_dim
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64)
    if num_tokens == 0:
        return
    row = kv_heads * head_dim
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[2], HEAD_DIM=head_dim, ROW=row, ROW_PAD=triton.next_power_of_2(row), num_warps=4,
        **pdl_launch(pdl, k),
    )
