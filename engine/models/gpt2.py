"""GPT-2 over the paged KV cache. Parameter names follow HF's `GPT2LMHeadModel`."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import AttentionBackend, AttentionMetadata
from engine.config import ModelConfig
from engine.models import padded_vocab_size


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention = attention
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        o = self.attention.forward(q, k, v, kv_cache, meta, self.scale)
        return self.c_proj(o.reshape(x.shape[0], -1))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionBackend) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, attention)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(padded_vocab_size(config.vocab_size), config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, attention) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)
        for block, kv_cache in zip(self.h, kv_caches):
            x = block(x, kv_cache, meta)
        return self.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.wte.weight)  # lm_head is tied to wte
        return logits[:, : self.config.vocab_size].float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF GPT-2 tensors in. HF stores linear weights as Conv1D [in, out]."""
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
