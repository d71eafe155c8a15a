"""Residual add fused with LayerNorm or RMSNorm: one launch instead of an add and a norm (the norm
itself is several launches when written in torch). One program normalises one row.

Rounding follows HF: the residual sum is rounded to the model dtype before it is normalised,
statistics are fp32, and RMSNorm rounds the normalised row before scaling by its weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from roseinfer_kernels.fp8_rows import check_fp8_out, store_row_e4m3
from roseinfer_kernels.pdl import pdl_launch, wait_for_previous_kernel


@triton.jit
def _add_norm_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, sum_ptr, scale_ptr,
    stride_x, stride_res, stride_out, stride_sum, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr,
    FP8_OUT: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = sum_ptr.dtype.element_ty  # the model's (out may be e4m3)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32))
        h = h.to(dtype)
        tl.store(sum_ptr + row * stride_sum + cols, h, mask=mask)
    h = h.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        y = (h * rstd).to(dtype).to(tl.float32) * w
    else:
        mean = tl.sum(h, axis=0) / n_cols
        centered = tl.where(mask, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
        y = centered * rstd * w
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if FP8_OUT:  # the row as the model dtype would hold it, in e4m3 with a scale for the row
        store_row_e4m3(y.to(dtype).to(tl.float32), out_ptr + row * stride_out + cols, scale_ptr + row, mask)
    else:
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    out: torch.Tensor | None = None,
    sum_out: torch.Tensor | None = None,
    pdl: bool = False,
    out_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) for x, residual [rows, hidden]; with residual None,
    (norm(x), x). LayerNorm when `rms` is False (weight and bias), else RMSNorm (weight only).
    `out` may be float8 e4m3 with `out_scale` [rows] fp32: the normed rows, rounded to x's dtype,
    quantized with a scale per row (as roseinfer_kernels.fp8.quantize_tokens_fp8), for an FP8
    projection that takes them as they are.
    `pdl`: launch with programmatic dependent launch (CUDA, Hopper or newer)."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be [rows, hidden] with contiguous rows"
    rows, hidden = x.shape
    assert weight.shape == (hidden,) and weight.is_contiguous()
    assert bias is None or (bias.shape == (hidden,) and bias.is_contiguous())
    assert not (rms and bias is not None), "RMSNorm has no bias"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
    out = torch.empty_like(x) if out is None else out
    fp8_out = check_fp8_out(out, out_scale, x)
    if residual is None:
        sum_out = x
    elif sum_out is None:
        sum_out = torch.empty_like(x)
    assert out.shape == x.shape and out.stride(1) == 1 and sum_out.shape == x.shape and sum_out.stride(1) == 1
    if rows == 0:
        return out, sum_out
    block = triton.next_power_of_2(hidden)
    # A launch parameter fixed by the shape (no autotune on the hot path).
    num_warps = min(8, max(1, block // 256))
    _add_norm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, bias if bias is not None else weight, out, sum_out,
        out_scale if fp8_out else weight,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), sum_out.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, RMS=rms, BLOCK=block, FP8_OUT=fp8_out,
        num_warps=num_warps, **pdl_launch(pdl, x),
    )
    return out, sum_out
