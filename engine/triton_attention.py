"""The CUDA attention backend: Triton kernels over the paged cache (see roseinfer_kernels/)."""

from __future__ import annotations

import torch

from engine.attention import KV_UNIT_SCALES, AttentionBackend, AttentionMetadata
from roseinfer_kernels.kv_cache import write_kv
from roseinfer_kernels.launch_table import cascade_prefix_launch, prefill_launch
from roseinfer_kernels.paged_attention import DecodeLaunch, cascade_decode, paged_decode
from roseinfer_kernels.prefill_attention import paged_prefill
from roseinfer_kernels.rotary import rotary_write_kv


class TritonAttention(AttentionBackend):
    name = "triton"
    fuses_rotary = True

    def __init__(self) -> None:
        self.pdl = False  # programmatic dependent launch; set by configure_decode_kernels

    def forward(self, q, k, v, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                kv_scales: tuple[float, float] = KV_UNIT_SCALES) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        k_scale, v_scale = kv_scales
        if rope is None:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping, pdl=self.pdl, k_scale=k_scale, v_scale=v_scale)
        else:  # one launch: q rotated in place, rotated k and v into the cache
            rotary_write_kv(q, k, v, k_cache, v_cache, meta.slot_mapping, *rope, pdl=self.pdl,
                            k_scale=k_scale, v_scale=v_scale)
        if meta.is_decode_only:
            launch = meta.decode_launch if meta.decode_launch is not None else DecodeLaunch()
            if meta.shared_prefix_len is not None:
                return cascade_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                      meta.shared_prefix_len, launch, cascade_prefix_launch(q.shape[-1]),
                                      k_scale=k_scale, v_scale=v_scale)
            return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, launch, pdl=self.pdl,
                                k_scale=k_scale, v_scale=v_scale)
        assert meta.prefill_tiles is not None, "a step with prefill tokens needs its tile list"
        return paged_prefill(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
            meta.prefill_tiles, prefill_launch(q.shape[-1]), k_scale=k_scale, v_scale=v_scale,
        )
