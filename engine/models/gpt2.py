"""GPT-2 over the paged KV cache. Parameter names follow HF's `GPT2LMHeadModel`."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from engine.attention import KV_UNIT_SCALES, AttentionBackend, AttentionMetadata
from engine.config import ModelConfig
from engine.models.layers import (
    AddNorm,
    DecodeLinear,
    ProjectionLaunches,
    VocabEmbedding,
    fused_kernel,
    padded_vocab_size,
    uses_fused_kernels,
)
from engine.parallel import SINGLE, TensorParallel, shard_rows


class GPT2Attention(nn.Module):
    """This rank's heads: c_attn column-parallel, c_proj row-parallel and summed across ranks."""

    def __init__(self, config: ModelConfig, attention: AttentionBackend, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads = tp.heads(config.num_heads)
        self.head_dim = config.head_dim
        local = self.num_heads * self.head_dim
        self.c_attn = DecodeLinear(config.hidden_size, 3 * local)
        self.c_proj = DecodeLinear(local, config.hidden_size)
        self.attention = attention
        self.scale = self.head_dim**-0.5
        self.kv_scales = KV_UNIT_SCALES  # an fp8 cache's (k_scale, v_scale), calibrated by the runner

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        o = self.attention.forward(q, k, v, kv_cache, meta, self.scale, kv_scales=self.kv_scales)
        return self.tp.all_reduce(self.c_proj(o.reshape(x.shape[0], -1)))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        local = config.intermediate_size // tp.size
        self.c_fc = DecodeLinear(config.hidden_size, local, gelu=True)  # tanh-GELU, as HF
        self.c_proj = DecodeLinear(local, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.c_proj(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionBackend, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        fused = uses_fused_kernels(attention)
        self.ln_1 = AddNorm(config.hidden_size, config.norm_eps, rms=False, fused=fused)
        self.attn = GPT2Attention(config, attention, tp)
        self.ln_2 = AddNorm(config.hidden_size, config.norm_eps, rms=False, fused=fused)
        self.mlp = GPT2MLP(config, tp)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous sublayer's output, not yet added to `residual` (the add is fused into ln_1)."""
        h, residual = self.ln_1(x, residual)
        h, residual = self.ln_2(self.attn(h, kv_cache, meta), residual)
        return self.mlp(h), residual


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionBackend, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.wte = VocabEmbedding(padded_vocab_size(config.vocab_size, tp.size), config.hidden_size, tp)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, attention, tp) for _ in range(config.num_layers))
        self.ln_f = AddNorm(config.hidden_size, config.norm_eps, rms=False, fused=uses_fused_kernels(attention))
        # The fused token + position lookup needs the whole vocabulary on this rank.
        self.embed_kernel = fused_kernel("embedding", "embed_add") if uses_fused_kernels(attention) and tp.size == 1 \
            else None
        self.lm_head_projection = ProjectionLaunches()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if self.embed_kernel is not None:
            x = self.embed_kernel(input_ids, positions, self.wte.weight, self.wpe.weight)
        else:
            x = self.wte(input_ids) + self.wpe(positions)
        residual = None
        for block, kv_cache in zip(self.h, kv_caches):
            x, residual = block(x, residual, kv_cache, meta)
        return self.ln_f(x, residual)[0]

    def lm_head_weight(self) -> torch.Tensor:
        return self.wte.weight  # GPT-2's LM head is tied to the token embedding

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Logits over the real vocabulary; fp32 for the sampler unless `upcast` is False
        (argmax needs no copy: the fp32 values are exact conversions)."""
        logits = self.tp.gather_columns(self.lm_head_projection(hidden, self.wte.weight, None))[:, : self.config.vocab_size]
        return logits.float() if upcast else logits

    def rank_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of `name` (linear weights already [out, in]); all of it on one rank.
        Row-parallel biases stay on rank 0 only: the all-reduce adds them once."""
        c, tp = self.config, self.tp
        if tp.size == 1:
            return tensor
        d = c.head_dim
        first, end = tp.head_range(c.num_heads)
        if ".attn.c_attn." in name:  # q, k and v blocks of hidden rows each: this rank's heads of all three
            return shard_rows(tensor, [(j * c.hidden_size + first * d, j * c.hidden_size + end * d) for j in range(3)])
        mlp_first, mlp_end = tp.split(c.intermediate_size)
        if ".mlp.c_fc." in name:
            return tensor[mlp_first:mlp_end]
        if name.endswith(".c_proj.bias"):
            return tensor if tp.rank == 0 else torch.zeros_like(tensor)
        if name.endswith(".attn.c_proj.weight"):
            return tensor[:, first * d:end * d]
        if name.endswith(".mlp.c_proj.weight"):
            return tensor[:, mlp_first:mlp_end]
        if name == "wte.weight":
            return tensor[self.wte.first_row:self.wte.end_row]
        return tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], presliced: bool = False) -> set[str]:
        """Copy HF GPT-2 tensors in. HF stores linear weights as Conv1D [in, out]; a tensor-parallel
        rank slices them after the transpose (whole tensors are read: `presliced` must be False)."""
        assert not presliced, "GPT-2's slices are taken after the Conv1D transpose"
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("transformer.")
            if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if name not in params:
                raise KeyError(f"unexpected GPT-2 weight {name!r}")
            if name.endswith(".weight") and any(p in name for p in ("c_attn", "c_proj", "c_fc")):
                tensor = tensor.t()
            tensor = self.rank_slice(name, tensor)
            params[name].data[: tensor.shape[0]].copy_(tensor)  # wte has padding rows
            loaded.add(name)
        return loaded


def to_hf_state_dict(model: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """Our weights under HF `GPT2LMHeadModel` names (Conv1D weights transposed back)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if name.endswith(".weight") and any(k in name for k in ("c_attn", "c_proj", "c_fc")):
            t = t.t()
        out[f"transformer.{name}"] = t.contiguous()
    vocab = model.config.vocab_size
    out["transformer.wte.weight"] = model.wte.weight.detach()[:vocab]
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
