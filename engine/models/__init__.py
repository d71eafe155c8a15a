"""Model families: one file each, attention through the paged backend."""

from __future__ import annotations

import torch.nn as nn

from engine.attention import AttentionBackend
from engine.config import ModelConfig
from engine.parallel import SINGLE, TensorParallel


def build_model(config: ModelConfig, attention: AttentionBackend, tp: TensorParallel = SINGLE) -> nn.Module:
    """The model family's module, holding this tensor-parallel rank's part of every weight."""
    if config.architecture == "gpt2":
        from engine.models.gpt2 import GPT2LMHeadModel

        return GPT2LMHeadModel(config, attention, tp)
    if config.architecture == "llama":
        from engine.models.llama import LlamaForCausalLM

        return LlamaForCausalLM(config, attention, tp)
    raise ValueError(f"unsupported architecture {config.architecture!r}")
