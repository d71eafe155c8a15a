"""SiLU(gate) * up over the fused gate/up projection: one launch instead of two.

Rounding follows HF: SiLU's result is rounded to the model dtype before the product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from roseinfer_kernels.fp8_rows import check_fp8_out, store_row_e4m3
from roseinfer_kernels.pdl import pdl_launch, wait_for_previous_kernel


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, scale_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr,
                         FP8_OUT: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_up = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = gate_up.dtype  # the model's (out may be e4m3)
    gate = gate_up.to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    if FP8_OUT:  # one program holds the whole row (BLOCK >= n_cols): its scale needs all of it
        store_row_e4m3((act * up).to(dtype).to(tl.float32), out_ptr + row * stride_out + cols, scale_ptr + row, mask)
    else:
        tl.store(out_ptr + row * stride_out + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, pdl: bool = False,
                 out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, 2 * n] = [gate | up] -> silu(gate) * up [rows, n]. `out` may be float8 e4m3 with
    `out_scale` [rows] fp32: the products, rounded to x's dtype, quantized with a scale per row
    (as roseinfer_kernels.fp8.quantize_tokens_fp8)."""
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device) if out is None else out
    assert out.shape == (rows, n) and out.stride(1) == 1
    fp8_out = check_fp8_out(out, out_scale, x)
    if rows == 0:
        return out
    # e4m3 rows: a program a row (the 8B's 14336 columns: 16 warps of 28 values a thread)
    block = triton.next_power_of_2(n) if fp8_out else min(1024, triton.next_power_of_2(n))
    num_warps = max(4, min(16, block // 1024)) if fp8_out else 4
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, out_scale if fp8_out else out, x.stride(0), out.stride(0),
                                                          n, BLOCK=block, FP8_OUT=fp8_out, num_warps=num_warps,
                                                          **pdl_launch(pdl, x))
    return out
