"""Layers both model families share: the residual add fused into the next norm."""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F


class AddNorm(nn.Module):
    """`norm(x + residual)` and the new residual stream `x + residual` (x alone when residual is None).

    LayerNorm (weight and bias, GPT-2) or RMSNorm (weight, Llama); parameter names match HF's.
    `fused` runs one Triton kernel (the CUDA path); otherwise plain torch with HF's rounding.
    """

    def __init__(self, hidden_size: int, eps: float, rms: bool, fused: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = None if rms else nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps
        self.rms = rms
        self.kernel = fused_kernel("norm", "add_norm") if fused else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kernel is not None:
            return self.kernel(x, residual, self.weight, self.bias, self.eps, self.rms)
        h = x if residual is None else x + residual
        if not self.rms:
            return F.layer_norm(h, (h.shape[-1],), self.weight, self.bias, self.eps), h
        h32 = h.float()
        normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(h.dtype), h


def uses_fused_kernels(attention) -> bool:
    """The Triton attention backend brings the other Triton kernels with it (norms, RoPE, SiLU)."""
    return attention.name == "triton"


def fused_kernel(module: str, name: str):
    """A launcher from `kernels/`, imported only when used: the torch path needs no Triton."""
    return getattr(importlib.import_module(f"kernels.{module}"), name)
