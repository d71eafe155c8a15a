"""Attention over the paged KV cache, behind one interface.

Cache layout, one tensor per layer: [2, num_blocks, num_kv_heads, block_size, head_dim]
(index 0 holds K, 1 holds V). Head-major blocks keep one head's tokens of a
block contiguous (block_size * head_dim elements), so the decode kernel reads
long contiguous runs. Token t of a sequence lives in block
`block_table[t // block_size]` at offset `t % block_size`; its flat slot is
`block_id * block_size + offset`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from roseinfer_kernels.fp8 import FP8_MAX


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the batch and in the paged cache."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: start of each sequence's tokens
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    # Decode-kernel launch parameters, looked up once per step (or per captured graph).
    decode_launch: object | None = None
    # The Triton prefill kernel's work list (roseinfer_kernels.prefill_attention.prefill_tiles), int32 on
    # the device; built by the runner for steps that carry prefill tokens.
    prefill_tiles: torch.Tensor | None = None
    # Decode only (the Triton backend): the tokens every row's block table starts with in the same
    # cache blocks, an int32 [1] on the device that a captured graph reads at each replay; set, the
    # step attends through cascade_decode (the shared prefix read once for the batch).
    shared_prefix_len: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


KV_UNIT_SCALES = (1.0, 1.0)


class AttentionBackend:
    """Writes this step's K/V into the cache, then attends over each sequence's context. A float8
    cache holds K / k_scale and V / v_scale (`kv_scales`, one pair per layer)."""

    name = "base"
    # Whether forward takes `rope` and rotates q and k itself (fused with the cache write).
    fuses_rotary = False

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        kv_scales: tuple[float, float] = KV_UNIT_SCALES,
    ) -> torch.Tensor:
        """`rope` = (positions, cos, sin): rotate q and k first (only backends that fuse it are
        given one; the torch path rotates in the model, with HF's arithmetic)."""
        raise NotImplementedError


def write_kv_torch(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                   kv_scales: tuple[float, float] = KV_UNIT_SCALES) -> None:
    block_size = kv_cache.shape[3]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    if kv_cache.dtype == torch.float8_e4m3fn:
        k = (k.float() / kv_scales[0]).clamp(-FP8_MAX, FP8_MAX)
        v = (v.float() / kv_scales[1]).clamp(-FP8_MAX, FP8_MAX)
    kv_cache[0][blocks, :, offsets] = k.to(kv_cache.dtype)
    kv_cache[1][blocks, :, offsets] = v.to(kv_cache.dtype)


def cached_tokens(cache: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Gathered cache entries as `dtype` values (a float8 cache's times its scale)."""
    if cache.dtype == torch.float8_e4m3fn:
        return (cache.float() * scale).to(dtype)
    return cache.to(dtype)


def gather_context(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks [..., blocks] of one cache half as tokens: [..., blocks, block_size, kv_heads, head_dim]."""
    return cache[block_ids].transpose(-3, -2)


def paged_decode_torch(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    kv_scales: tuple[float, float] = KV_UNIT_SCALES,
) -> torch.Tensor:
    """One query token per sequence, attention in fp32 over the gathered context."""
    num_seqs, num_heads, head_dim = q.shape
    _, _, num_kv_heads, block_size, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    ctx = block_tables.shape[1] * block_size
    keys = gather_context(kv_cache[0], block_tables).reshape(num_seqs, ctx, num_kv_heads, head_dim)
    values = gather_context(kv_cache[1], block_tables).reshape(num_seqs, ctx, num_kv_heads, head_dim)
    keys, values = cached_tokens(keys, kv_scales[0], torch.float32), cached_tokens(values, kv_scales[1], torch.float32)
    qg = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, keys) * scale
    valid = torch.arange(ctx, device=q.device)[None, :] < seq_lens[:, None]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Slots past a sequence's end hold stale or uninitialised memory (maybe NaN): 0 * NaN = NaN.
    values = values.masked_fill(~valid[:, :, None, None], 0.0)
    out = torch.einsum("bhgl,blhd->bhgd", probs, values)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


class TorchAttention(AttentionBackend):
    """Reference-quality attention in plain torch; runs anywhere."""

    name = "torch"

    def forward(self, q, k, v, kv_cache, meta, scale, rope=None, kv_scales=KV_UNIT_SCALES):
        assert rope is None, "the torch backend does not fuse RoPE"
        write_kv_torch(kv_cache, k, v, meta.slot_mapping, kv_scales)
        if meta.is_decode_only:
            return paged_decode_torch(q, kv_cache, meta.block_tables, meta.seq_lens, scale, kv_scales)
        return self._varlen(q, k, v, kv_cache, meta, scale, kv_scales)

    @staticmethod
    def _varlen(q, k, v, kv_cache, meta, scale, kv_scales=KV_UNIT_SCALES):
        num_heads, head_dim = q.shape[1:]
        _, _, num_kv_heads, block_size, _ = kv_cache.shape
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)
        starts = meta.query_start_loc_host
        for i, seq_len in enumerate(meta.seq_lens_host):
            start, end = starts[i], starts[i + 1]
            num_new = end - start
            if num_new == seq_len:  # nothing cached before: attend to the fresh K/V
                keys, values = k[start:end], v[start:end]
            else:
                num_blocks = -(-seq_len // block_size)
                table = meta.block_tables[i, :num_blocks]
                keys = cached_tokens(gather_context(kv_cache[0], table).reshape(-1, num_kv_heads, head_dim)[:seq_len],
                                     kv_scales[0], q.dtype)
                values = cached_tokens(gather_context(kv_cache[1], table).reshape(-1, num_kv_heads, head_dim)[:seq_len],
                                       kv_scales[1], q.dtype)
            query_pos = torch.arange(seq_len - num_new, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1),
                keys.repeat_interleave(group, dim=1).transpose(0, 1),
                values.repeat_interleave(group, dim=1).transpose(0, 1),
                attn_mask=mask,
                scale=scale,
            )
            out[start:end] = o.transpose(0, 1)
        return out
