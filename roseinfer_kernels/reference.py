"""Pure-torch references for every kernel in this package (fp32 math, any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_kv_ref(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale as float8 e4m3, clamped to its +-448 (round to nearest even)."""
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store k/v [num_tokens, kv_heads, head_dim] at flat cache slots (caches [blocks, kv_heads, block_size, head_dim]); slot < 0 means skip.
    A float8 cache gets k / k_scale and v / v_scale."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[2]
    if k_cache.dtype == torch.float8_e4m3fn:
        k, v = quantize_kv_ref(k, k_scale), quantize_kv_ref(v, v_scale)
    for cache, new in ((k_cache, k[keep]), (v_cache, v[keep])):
        for j, slot in enumerate(slots.tolist()):
            cache[slot // block_size, :, slot % block_size] = new[j]


def _gather(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens 0..length-1 of one sequence as [length, kv_heads, head_dim] (cache is [blocks, kv_heads, block_size, head_dim])."""
    _, kv_heads, block_size, head_dim = cache.shape
    blocks = table[: -(-length // block_size)]
    return cache[blocks].transpose(1, 2).reshape(-1, kv_heads, head_dim)[:length]


def paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale: float) -> torch.Tensor:
    """One query token per sequence: q [num_seqs, heads, dim] attends to its whole context."""
    num_heads = q.shape[1]
    out = torch.empty_like(q)
    for i, length in enumerate(seq_lens.tolist()):
        if length == 0:
            out[i] = 0
            continue
        k = _gather(k_cache, block_tables[i], length).float()
        v = _gather(v_cache, block_tables[i], length).float()
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[i].float(), k) * scale
        out[i] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def paged_prefill_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (the last q_len of seq_len) over its cached context."""
    num_heads = q.shape[1]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, length in enumerate(seq_lens.tolist()):
        s, e = starts[i], starts[i + 1]
        n = e - s
        k = _gather(k_cache, block_tables[i], length).float()
        v = _gather(v_cache, block_tables[i], length).float()
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,lhd->hql", q[s:e].float(), k) * scale
        q_pos = torch.arange(length - n, length, device=q.device)
        mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~mask[None], float("-inf"))
        out[s:e] = torch.einsum("hql,lhd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


def add_norm_ref(x, residual, weight, bias, eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) as HF computes it: the sum in the model dtype, statistics in fp32."""
    h = x if residual is None else x + residual
    h32 = h.float()
    if rms:
        normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return weight * normed, h
    return torch.nn.functional.layer_norm(h32, (h.shape[-1],), weight.float(), None if bias is None else bias.float(), eps).to(x.dtype), h


def rotary_ref(qkv, positions, cos, sin, num_rotated_heads: int, head_dim: int) -> torch.Tensor:
    """A rotated copy of qkv [tokens, width]: the first num_rotated_heads heads, rotate-half style, in fp32."""
    out = qkv.clone()
    half = head_dim // 2
    heads = qkv[:, : num_rotated_heads * head_dim].float().view(qkv.shape[0], num_rotated_heads, head_dim)
    c = cos[positions].float()[:, None, :]
    s = sin[positions].float()[:, None, :]
    x1, x2 = heads[..., :half], heads[..., half:]
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    out[:, : num_rotated_heads * head_dim] = rotated.reshape(qkv.shape[0], -1).to(qkv.dtype)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool,
               weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias in fp32, rounded to the input dtype; then tanh-GELU (fp32, rounded), as
    torch does it for GPT-2's MLP. A float8 weight is q * weight_scale per output row."""
    w = weight.float() if weight_scale is None else weight.float() * weight_scale.float()[:, None]
    y = F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
    return F.gelu(y.float(), approximate="tanh").to(x.dtype) if gelu else y


def decode_step_inputs_ref(base_pos, active, block_tables, step: int, block_size: int):
    """(positions, seq_lens, slot_mapping) of one step of a greedy multi-step run."""
    pos = base_pos + step
    seq_lens = torch.where(active, pos + 1, 0).to(torch.int32)
    blocks = block_tables.gather(1, (pos // block_size).clamp(max=block_tables.shape[1] - 1).unsqueeze(1)).squeeze(1)
    slots = torch.where(active, blocks.long() * block_size + pos % block_size, -1)
    return pos, seq_lens, slots


def embed_add_ref(input_ids, positions, wte, wpe) -> torch.Tensor:
    return F.embedding(input_ids, wte) + F.embedding(positions, wpe)


def rotary_write_kv_ref(q, k, v, k_cache, v_cache, slot_mapping, positions, cos, sin,
                        k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """The rotated q (a copy); rotated k and v written into the caches at the slots."""
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    rows = torch.cat([q.reshape(tokens, -1), k.reshape(tokens, -1)], dim=1)
    rotated = rotary_ref(rows, positions, cos, sin, heads + kv_heads, head_dim)
    q_rot = rotated[:, : heads * head_dim].view(tokens, heads, head_dim)
    k_rot = rotated[:, heads * head_dim:].reshape(tokens, kv_heads, head_dim).to(q.dtype)
    write_kv_ref(k_rot, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)  # rounded to the model dtype first
    return q_rot


def gguf_dequantize_ref(blocks: torch.Tensor, k: int, scheme: str) -> torch.Tensor:
    """GGUF Q4_1 (fp16 d, fp16 m, 16 bytes of nibbles: w = d q + m) or Q8_0 (fp16 d, 32 int8:
    w = d q) blocks [n, k / 32 * bytes] uint8 as fp32 [n, k]."""
    n = blocks.shape[0]
    per = {"q4_1": 20, "q8_0": 34}[scheme]
    b = blocks.view(n, k // 32, per)
    d = b[..., :2].contiguous().view(torch.float16).float()  # [n, blocks, 1]
    if scheme == "q4_1":
        m = b[..., 2:4].contiguous().view(torch.float16).float()
        qs = b[..., 4:].long()
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # low nibbles first, then high
        w = d * codes + m
    else:
        codes = b[..., 2:].contiguous().view(torch.int8).float()
        w = d * codes
    return w.reshape(n, k)


def mask_logits_ref(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf where a token's bit (bit t % 32 of int32 word t // 32) is 0; a new tensor."""
    vocab = logits.shape[1]
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=bitmask.device)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()
    return logits.masked_fill(~allowed, float("-inf"))


def topk_topp_cutoff_ref(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The sort-based cut (as engine.sampler.sample_rows makes it): each row's smallest kept logit
    after top-k (>= vocab: none), then top-p on the softmax of what top-k kept (>= 1: none)."""
    rows, vocab = logits.shape
    sorted_logits = logits.float().sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(1, (top_k.clamp(max=vocab) - 1).long()[:, None])
    probs = torch.softmax(sorted_logits.masked_fill(sorted_logits < kth, float("-inf")), dim=-1)
    kept = ((probs.cumsum(dim=-1) - probs) < top_p[:, None].float()) & (sorted_logits >= kth)
    last = sorted_logits.gather(1, (kept.sum(dim=-1) - 1).clamp(min=0)[:, None])
    return torch.where(top_p[:, None] >= 1.0, kth, last)[:, 0]


def filtered_sample_ref(logits: torch.Tensor, noise: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                        min_p: torch.Tensor) -> torch.Tensor:
    """The sort-based draw (as engine.sampler.sample_rows makes it): each row's argmax of logits -
    log(noise) over the tokens top-k, then top-p on what top-k kept (topk_topp_cutoff_ref's cut),
    then min-p of the largest probability keep."""
    keep = logits >= topk_topp_cutoff_ref(logits, top_k, top_p)[:, None]
    probs = torch.softmax(logits.float().masked_fill(~keep, float("-inf")), dim=-1)
    keep &= probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return torch.where(keep, logits.float() - noise.log(), float("-inf")).argmax(dim=-1)
