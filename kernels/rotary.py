"""Rotary position embedding (HF's rotate-half form) applied in place to the query and key heads
of the fused qkv projection: one launch for what torch does in about a dozen.

Head h of token t holds [x1, x2] (two halves of head_dim); with the angle table of position p,
it becomes [x1 cos - x2 sin, x2 cos + x1 sin]. Math is fp32; the tables are read in their own
dtype (the model's, as HF casts them before use).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import pdl_launch, wait_for_previous_kernel


@triton.jit
def _rotary_kernel(
    qk_ptr, positions_ptr, cos_ptr, sin_ptr,
    stride_tok, stride_head, stride_table, num_heads,
    HALF: tl.constexpr, HEADS_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < num_heads
    cos = tl.load(cos_ptr + pos * stride_table + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_table + d).to(tl.float32)
    base = qk_ptr + tok * stride_tok + h * stride_head
    x1 = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + d, mask=mask, other=0.0).to(tl.float32)
    dtype = qk_ptr.dtype.element_ty
    tl.store(base + d, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(base + HALF + d, (x2 * cos + x1 * sin).to(dtype), mask=mask)


def rotary_inplace(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   num_rotated_heads: int, head_dim: int, pdl: bool = False) -> torch.Tensor:
    """Rotate the first `num_rotated_heads` heads (the query heads, then the key heads) of each row
    of qkv [tokens, >= num_rotated_heads * head_dim], in place. cos/sin [max_positions, head_dim / 2]
    hold each position's angles; positions [tokens] int."""
    assert qkv.dim() == 2 and qkv.stride(1) == 1 and qkv.shape[1] >= num_rotated_heads * head_dim
    assert head_dim in (16, 32, 64, 128, 256), "head_dim must be a power of two in [16, 256]"
    assert cos.shape == sin.shape and cos.shape[1] == head_dim // 2 and cos.stride() == sin.stride() and cos.stride(1) == 1
    assert positions.shape == (qkv.shape[0],) and not positions.dtype.is_floating_point
    if qkv.shape[0] == 0:
        return qkv
    _rotary_kernel[(qkv.shape[0],)](
        qkv, positions, cos, sin, qkv.stride(0), head_dim, cos.stride(0), num_rotated_heads,
        HALF=head_dim // 2, HEADS_PAD=triton.next_power_of_2(num_rotated_heads), num_warps=4, **pdl_launch(pdl, qkv),
    )
    return qkv
