"""The CPU attention backend: the torch backend, with the decode step's RoPE, cache write and
attention in C++ kernels (roseinfer_kernels/cpu_attention.py): two calls a layer instead of about thirty
torch operations, and no gather of the context. Prefill keeps the torch path. float32."""

from __future__ import annotations

import torch

from engine.attention import KV_UNIT_SCALES, AttentionMetadata, TorchAttention, write_kv_torch
from roseinfer_kernels.cpu_attention import paged_decode, rotary_write_kv


class CpuAttention(TorchAttention):
    name = "cpu"
    fuses_rotary = True  # the Llama model hands RoPE to forward

    def forward(self, q, k, v, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                kv_scales: tuple[float, float] = KV_UNIT_SCALES) -> torch.Tensor:  # no fp8 cache here: unit scales
        if rope is None:
            write_kv_torch(kv_cache, k, v, meta.slot_mapping)
        else:  # q and k rotated in place (prefill below reads the fresh k), both written to the cache
            rotary_write_kv(q, k, v, kv_cache[0], kv_cache[1], meta.slot_mapping, *rope)
        if meta.is_decode_only:
            return paged_decode(q, kv_cache[0], kv_cache[1], meta.block_tables, meta.seq_lens, scale)
        return self._varlen(q, k, v, kv_cache, meta, scale)
