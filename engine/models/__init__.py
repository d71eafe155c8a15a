"""Model families: one file each, attention through the paged backend."""

from __future__ import annotations

import torch.nn as nn

from engine.attention import AttentionBackend
from engine.config import ModelConfig


def build_model(config: ModelConfig, attention: AttentionBackend) -> nn.Module:
    if config.architecture == "gpt2":
        from engine.models.gpt2 import GPT2LMHeadModel

        return GPT2LMHeadModel(config, attention)
    if config.architecture == "llama":
        from engine.models.llama import LlamaForCausalLM

        return LlamaForCausalLM(config, attention)
    raise ValueError(f"unsupported architecture {config.architecture!r}")
