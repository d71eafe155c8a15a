"""How far the skinny kernel's W8A8 launches (`LinearLaunch.act_fp8`) are from exact arithmetic on
the activations as they quantize them, on the GPU: for each of the kernel tests' cases and both
16-bit dtypes, the worst row's relative error against a float64 CPU reference over
`fake_quantize_slices_fp8` (round to nearest, as the kernel should), against one that rounds toward
zero instead, and, as a control, the same launch without `act_fp8` (W8A16) against its own float64
reference. The tenth session saw W8A8 rows up to 1.2e-2 from the (fp32, CUDA) reference.

    python scripts/w8a8_numerics.py

On the CPU (TRITON_INTERPRET=1) the W8A8 columns mean nothing (the interpreter rounds to e4m3 its
own way), but the control does: bf16 rows 4.6e-3 to 9.3e-3 from float64, fp16 0 to 2e-5. Rounding
a fp32 sum to bf16 and the exact sum to bf16 differ by one ulp where they straddle a rounding
boundary (up to 2^-7 of an element); with a rounding before GELU, twice.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

from roseinfer_kernels.fp8 import FP8, FP8_MAX, fake_quantize_slices_fp8
from roseinfer_kernels.linear import SplitKWorkspace, skinny_linear
from roseinfer_kernels.reference import quantize_kv_ref

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "kernels"))
from test_kernels import LINEAR_CASES  # noqa: E402  (the cases the CUDA tests run)


def toward_zero_slices(x: torch.Tensor, block_k: int) -> torch.Tensor:
    """fake_quantize_slices_fp8, but each value rounded toward zero instead of to nearest."""
    m, k = x.shape
    s = F.pad(x.double(), (0, -k % block_k)).view(-1, block_k)
    scale = s.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    v = (s / scale).clamp(-FP8_MAX, FP8_MAX)
    q = v.float().to(FP8)
    bits = q.view(torch.uint8).clone()
    bits[q.double().abs() > v.abs()] -= 1  # one e4m3 step toward zero; the sign bit is untouched
    return (bits.view(FP8).double() * scale).view(m, -1)[:, :k]


def exact(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, gelu: bool,
          dtype: torch.dtype) -> torch.Tensor:
    """The projection in float64 on the CPU, rounded to `dtype` (and GELU'd as the kernel does)."""
    w = weight.cpu().double() * scale.cpu().double()[:, None]
    y = F.linear(x.cpu().double(), w, None if bias is None else bias.cpu().double()).to(dtype)
    return (F.gelu(y.double(), approximate="tanh").to(dtype) if gelu else y).double()


def worst_row(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.cpu().double()
    return max(((got[r] - ref[r]).norm() / ref[r].norm().clamp(min=1e-30)).item() for r in range(got.shape[0]))


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{'case (rows, n, k)':22} {'dtype':9} {'W8A8 vs nearest':>16} {'vs toward zero':>15} {'W8A16 control':>14}")
    for rows, n, k, has_bias, gelu, launch in LINEAR_CASES:
        for dtype in (torch.bfloat16, torch.float16):
            torch.manual_seed(rows + 131 * k)  # the CUDA test's inputs
            x = (torch.randn(rows, k, device=device) * torch.logspace(-2, 2, rows, device=device)[:, None]).to(dtype)
            weight = quantize_kv_ref(torch.randn(n, k, device=device) * 100, 1.0)
            scale = torch.rand(n, device=device) * 0.02 / k**0.5 + 1e-4
            bias = torch.randn(n, device=device).to(dtype) if has_bias else None
            w8a8 = dataclasses.replace(launch, act_fp8=True)
            got = skinny_linear(x, weight, bias, gelu, w8a8, SplitKWorkspace(), weight_scale=scale)
            nearest = exact(fake_quantize_slices_fp8(x.float().cpu(), launch.block_k), weight, scale, bias, gelu, dtype)
            zero = exact(toward_zero_slices(x.float().cpu(), launch.block_k), weight, scale, bias, gelu, dtype)
            w8a16 = skinny_linear(x, weight, bias, gelu, launch, SplitKWorkspace(), weight_scale=scale)
            control = exact(x.float(), weight, scale, bias, gelu, dtype)
            print(f"{str((rows, n, k)):22} {str(dtype).removeprefix('torch.'):9} {worst_row(got, nearest):16.2e} "
                  f"{worst_row(got, zero):15.2e} {worst_row(w8a16, control):14.2e}")


if __name__ == "__main__":
    main()
