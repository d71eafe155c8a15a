"""float8 e4m3 helpers shared by the FP8 projections (engine/models/layers.py) and the tuner: a
scale per weight row, a scale per activation row, and the scaled GEMM (`torch._scaled_mm`:
cuBLASLt's FP8 GEMM on Hopper, torch's reference kernel on the CPU). Plain torch, no Triton."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value: past it a cast gives NaN, so everything is clamped


def quantize_rows_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (float8 e4m3 [N, K], fp32 scale [N]): each output channel scaled so its largest
    magnitude maps to e4m3's largest value; weight ~= q * scale[:, None]."""
    scale = weight.abs().amax(dim=1).float().clamp(min=1e-12) / FP8_MAX
    q = (weight.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_tokens_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] activations -> (float8 e4m3 [M, K], fp32 scale [M, 1]), one scale per token. Each row
    is multiplied by FP8_MAX / its largest magnitude (one IEEE division a row, then products), the
    way the skinny kernel's W8A8 launches and roseinfer_kernels.fp8_rows quantize, so that all of
    them round every value alike (a division per value would not: the kernel's fp32 division is
    not IEEE-rounded)."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    # Tensors divided by tensors, IEEE-rounded as the kernels' div_rn: torch computes `FP8_MAX / amax`
    # as amax.reciprocal() * FP8_MAX (rounded twice: a product on an e4m3 rounding tie then lands on
    # the other side of it), and on CUDA `amax / FP8_MAX` as amax times 1 / FP8_MAX.
    fp8_max = torch.full_like(amax, FP8_MAX)
    return (x.float() * (fp8_max / amax)).clamp(-FP8_MAX, FP8_MAX).to(FP8), amax / fp8_max


def fake_quantize_slices_fp8(x: torch.Tensor, block_k: int) -> torch.Tensor:
    """[M, K] activations as the skinny kernel's W8A8 launches see them (`LinearLaunch.act_fp8`),
    in fp32: each row's slices of `block_k` columns (from column 0) scaled so that their largest
    magnitude maps to e4m3's largest value, rounded to e4m3 and scaled back."""
    m, k = x.shape
    q, scale = quantize_tokens_fp8(F.pad(x.float(), (0, -k % block_k)).view(-1, block_k))  # a slice per "token"
    return (q.float() * scale).view(m, -1)[:, :k]


def scaled_mm_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (quantized here per token) @ weight [N, K]^T (e4m3, scale [N] per row), in x's dtype."""
    xq, x_scale = quantize_tokens_fp8(x)
    return scaled_mm_prequantized(xq, x_scale.view(-1), weight, weight_scale, x.dtype)


def scaled_mm_prequantized(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           out_dtype: torch.dtype) -> torch.Tensor:
    """xq [M, K] (e4m3, scale [M] per row) @ weight [N, K]^T (e4m3, scale [N] per row), in `out_dtype`.
    Row-wise scaled FP8 GEMMs produce bf16: what cuBLASLt supports for per-row scales."""
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale.view(-1, 1), scale_b=weight_scale.view(1, -1),
                         out_dtype=torch.bfloat16)
    return y.to(out_dtype)
