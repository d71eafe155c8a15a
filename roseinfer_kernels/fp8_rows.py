"""Rows handed to an FP8 projection already in float8 e4m3: a kernel that writes a row (a norm,
SiLU * up) quantizes it on the way out, with one fp32 scale per row, so the projection multiplies
e4m3 by e4m3 without a quantizing pass of its own (torch's took 17-27 us a call on the H200, more
than the 8B's qkv projection itself); `quantize_rows` does it in a launch of its own for an input
no such kernel writes. The arithmetic is roseinfer_kernels.fp8.quantize_tokens_fp8's (the
reference the tests compare every code with): one IEEE division a row for the factor, then
products, so both round every value alike."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from roseinfer_kernels.pdl import pdl_launch, wait_for_previous_kernel


# Triton's CPU interpreter casts to e4m3 without carrying a rounded-up mantissa into the exponent
# (124 becomes 64, not 128): there the values are put on e4m3's grid first, with integer ops, so
# the cast has nothing to round. The GPU's conversion rounds correctly and takes them as they are.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _on_e4m3_grid(y):
    """fp32 values rounded to nearest-even on e4m3's grid: 3 mantissa bits, and below 2^-6 (its
    subnormals) steps of 2^-9. For the interpreter only (numpy's arithmetic: the add-and-subtract
    of 1.5 * 2^23 that rounds to an integer is not folded away there)."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    magic = 12582912.0
    subnormal = ((y * 512.0 + magic) - magic) / 512.0
    return tl.where(tl.abs(y) < 0.015625, subnormal, bits.to(tl.float32, bitcast=True))


@triton.jit
def store_row_e4m3(y, out_ptrs, scale_ptr, mask):
    """Store the fp32 row `y` (entries outside `mask` ignored) at `out_ptrs` in e4m3, scaled so
    that its largest magnitude maps to e4m3's largest value, and that scale at `scale_ptr`."""
    amax = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0), 1e-12)
    fp8_max = 448.0  # roseinfer_kernels.fp8.FP8_MAX
    factor = tl.math.div_rn(tl.full([], fp8_max, tl.float32), amax)
    q = tl.clamp(y * factor, -fp8_max, fp8_max)
    if INTERPRETED:
        q = _on_e4m3_grid(q)
    q = q.to(tl.float8e4nv)
    tl.store(out_ptrs, q, mask=mask)
    tl.store(scale_ptr, tl.math.div_rn(amax, tl.full([], fp8_max, tl.float32)))


def check_fp8_out(out: torch.Tensor, out_scale: torch.Tensor | None, like: torch.Tensor) -> bool:
    """Whether a kernel's `out` is e4m3 rows with `out_scale` (asserted: one fp32 scale per row of
    `like`), or an output in the model dtype (then no scale)."""
    if out.dtype != torch.float8_e4m3fn:
        assert out_scale is None and out.dtype == like.dtype, "out: the input's dtype, or e4m3 with out_scale"
        return False
    assert out_scale is not None and out_scale.dtype == torch.float32 and out_scale.shape == (like.shape[0],) \
        and out_scale.is_contiguous(), "e4m3 rows need out_scale [rows] fp32"
    return True


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, n_cols, BLOCK: tl.constexpr,
                          USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    store_row_e4m3(x, q_ptr + row * stride_q + cols, scale_ptr + row, mask)


def quantize_rows(x: torch.Tensor, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] -> (e4m3 [rows, cols], fp32 scale [rows]), one launch, a program a row: for
    an FP8 projection whose input no kernel of ours writes in e4m3 (o_proj after attention), where
    the launch table measured quantizing first and multiplying e4m3 by e4m3 faster than widening
    its weights (W8A16)."""
    assert x.dim() == 2 and x.stride(1) == 1
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(cols)
        _quantize_rows_kernel[(rows,)](x, q, scale, x.stride(0), q.stride(0), cols, BLOCK=block,
                                       num_warps=max(4, min(16, block // 1024)), **pdl_launch(pdl, x))
    return q, scale
