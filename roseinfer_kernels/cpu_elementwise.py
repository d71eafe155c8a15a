"""Residual add + RMSNorm and SiLU * up on the CPU in one call each (roseinfer_kernels/cpu/elementwise.cpp,
built by roseinfer_kernels/cpu_build.py). float32, HF's arithmetic."""

from __future__ import annotations

import torch

from roseinfer_kernels.cpu_build import extension


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual); with residual None, (RMSNorm(x) * weight, x)."""
    assert x.dtype == weight.dtype == torch.float32 and x.dim() == 2 and not x.is_cuda
    assert residual is None or (residual.shape == x.shape and residual.stride(1) == 1)
    return tuple(extension().add_rms_norm(x, residual, weight, eps))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2n] = [gate | up] -> silu(gate) * up [rows, n]."""
    assert gate_up.dtype == torch.float32 and gate_up.dim() == 2 and not gate_up.is_cuda
    return extension().silu_mul(gate_up)
