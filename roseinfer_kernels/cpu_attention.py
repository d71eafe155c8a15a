"""The CPU decode step's attention work (roseinfer_kernels/cpu/decode_attention.cpp, built by
roseinfer_kernels/cpu_build.py): RoPE fused with the KV-cache write, and decode attention over the paged
cache without gathering it. fp32."""

from __future__ import annotations

import torch

from roseinfer_kernels.cpu_build import extension


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """q [tokens, heads, dim] and k [tokens, kv_heads, dim] rotated in place (HF's rotate-half RoPE;
    cos/sin [positions, dim / 2]); then k and v stored at `slot_mapping` (negative: skipped) in the
    caches [blocks, kv_heads, block_size, dim]."""
    assert q.dtype == k.dtype == v.dtype == k_cache.dtype == cos.dtype == torch.float32 and not q.is_cuda
    assert k.shape == v.shape and q.shape[0] == k.shape[0] == slot_mapping.shape[0] == positions.shape[0]
    assert cos.shape == sin.shape and cos.shape[1] * 2 == q.shape[2] == k_cache.shape[3]
    extension().rotary_write_kv(q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence, q [seqs, heads, dim], over its first seq_lens[s] cached tokens
    (block_tables [seqs, >= blocks]); a length of 0 gives zeros. Returns [seqs, heads, dim]."""
    assert q.dtype == k_cache.dtype == torch.float32 and not q.is_cuda
    assert q.shape[1] % k_cache.shape[1] == 0 and q.shape[2] == k_cache.shape[3]
    assert block_tables.shape[0] == q.shape[0] == seq_lens.shape[0]
    return extension().paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
