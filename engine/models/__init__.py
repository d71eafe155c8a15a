"""Model families: one file each, attention through the paged backend."""

from __future__ import annotations

import torch.nn as nn

from engine.attention import AttentionBackend
from engine.config import ModelConfig


def padded_vocab_size(vocab_size: int) -> int:
    """Rows of the embedding / LM-head matrix: a multiple of 64, so cuBLAS picks its aligned
    (fast) kernels for the logits GEMM; logits past the real vocabulary are sliced off."""
    return -(-vocab_size // 64) * 64


def build_model(config: ModelConfig, attention: AttentionBackend) -> nn.Module:
    if config.architecture == "gpt2":
        from engine.models.gpt2 import GPT2LMHeadModel

        return GPT2LMHeadModel(config, attention)
    if config.architecture == "llama":
        from engine.models.llama import LlamaForCausalLM

        return LlamaForCausalLM(config, attention)
    raise ValueError(f"unsupported architecture {config.architecture!r}")
