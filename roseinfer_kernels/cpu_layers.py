"""A Llama decode step's decoder layers in one C++ call (roseinfer_kernels/cpu/decode_layers.cpp, built by
roseinfer_kernels/cpu_build.py): the same kernels the Python path calls per layer, without the Python
between them. fp32, GGUF-block projections, the CPU attention's cache layout."""

from __future__ import annotations

import torch

from roseinfer_kernels.cpu_build import extension


def decode_layers(x: torch.Tensor, layers: list[list[torch.Tensor]], q4_1: list[bool], slot_mapping: torch.Tensor,
                  positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, hidden] (one token a sequence) through every layer; `layers` holds, per layer, (input
    norm weight, qkv blocks, o blocks, post-attention norm weight, gate/up blocks, down blocks, KV
    cache); `q4_1` each projection's scheme (qkv, o, gate_up, down: Q4_1, else Q8_0). Returns (the
    last MLP's output, the residual stream) for the final norm."""
    assert x.dtype == torch.float32 and x.dim() == 2 and not x.is_cuda and len(q4_1) == 4
    return tuple(extension().decode_layers(x, layers, q4_1, slot_mapping, positions, cos, sin, block_tables, seq_lens,
                                           heads, kv_heads, head_dim, intermediate, eps, scale))
