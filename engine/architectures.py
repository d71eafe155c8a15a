"""Architectures known by name, for `--load-format dummy` runs of models whose weights are not here.

Each entry is the public shape of a released checkpoint (its `config.json`): sizes, heads, RoPE and
its scaling, vocabulary, special tokens. With random weights the compute and memory traffic are
the real model's, so benchmarks of these names say what the real checkpoint would cost. Real
weights still come from a local HF directory or a GGUF file.
"""

from __future__ import annotations

from engine.config import ModelConfig

# Llama 3.1 / 3.2 RoPE: long-context frequency scaling over the 8k-token original window.
_LLAMA3_ROPE_8 = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                  ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
_LLAMA3_ROPE_32 = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                   ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
# The instruct models end a turn with <|eot_id|> (128009) and a tool call with <|eom_id|> (128008).
_LLAMA3_EOS = (128001, 128008, 128009)


def _llama3(hidden: int, layers: int, heads: int, inter: int, head_dim: int = 128, tie: bool = False,
            rope=_LLAMA3_ROPE_8) -> ModelConfig:
    return ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=8, head_dim=head_dim, intermediate_size=inter, max_position_embeddings=131072,
        norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope, tie_word_embeddings=tie,
        eos_token_ids=_LLAMA3_EOS, bos_token_id=128000,
    )


ARCHITECTURES: dict[str, ModelConfig] = {
    "llama-3.2-1b": _llama3(2048, 16, 32, 8192, head_dim=64, tie=True, rope=_LLAMA3_ROPE_32),
    "llama-3.2-3b": _llama3(3072, 28, 24, 8192, tie=True, rope=_LLAMA3_ROPE_32),
    "llama-3.1-8b": _llama3(4096, 32, 32, 14336),
    "llama-3.1-70b": _llama3(8192, 80, 64, 28672),
    # Qwen2.5: biases on q/k/v only, 1e6 RoPE base, GQA 28/4 (a group of 7).
    "qwen2.5-7b": ModelConfig(
        architecture="llama", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
        head_dim=128, intermediate_size=18944, max_position_embeddings=32768, norm_eps=1e-6, rope_theta=1e6,
        attention_bias=True, tie_word_embeddings=False, eos_token_ids=(151645, 151643), bos_token_id=151643,
    ),
    # Mistral-7B v0.3: full attention (no sliding window), 32k vocabulary.
    "mistral-7b": ModelConfig(
        architecture="llama", vocab_size=32768, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, intermediate_size=14336, max_position_embeddings=32768, norm_eps=1e-5, rope_theta=1e6,
        tie_word_embeddings=False, eos_token_ids=(2,), bos_token_id=1,
    ),
}

# Other spellings people type, including the hub ids.
_ALIASES = {
    "meta-llama/llama-3.2-1b": "llama-3.2-1b", "meta-llama/llama-3.2-1b-instruct": "llama-3.2-1b",
    "llama-3.2-1b-instruct": "llama-3.2-1b",
    "meta-llama/llama-3.2-3b": "llama-3.2-3b", "meta-llama/llama-3.2-3b-instruct": "llama-3.2-3b",
    "llama-3.2-3b-instruct": "llama-3.2-3b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "llama-3.1-8b-instruct": "llama-3.1-8b", "meta-llama/meta-llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/llama-3.1-70b": "llama-3.1-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
    "llama-3.1-70b-instruct": "llama-3.1-70b",
    "qwen/qwen2.5-7b": "qwen2.5-7b", "qwen/qwen2.5-7b-instruct": "qwen2.5-7b", "qwen2.5-7b-instruct": "qwen2.5-7b",
    "mistralai/mistral-7b-v0.3": "mistral-7b", "mistralai/mistral-7b-instruct-v0.3": "mistral-7b",
    "mistral-7b-instruct": "mistral-7b",
}


def named_architecture(name: str) -> tuple[str, ModelConfig] | None:
    """(canonical name, config) for a known architecture name or hub id, else None."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    config = ARCHITECTURES.get(key)
    return None if config is None else (key, config)


def decode_bytes_per_step(config: ModelConfig, dtype_bytes: int, batch: int = 1, context: int = 0,
                          projection_bytes: int | None = None, kv_bytes: int | None = None) -> int:
    """Bytes a decode step must read: every weight matrix once (the embedding table only as the LM
    head when tied: the lookup touches a row per sequence), plus each sequence's K/V so far.
    `projection_bytes` (fp8 weights: 1) and `kv_bytes` (an fp8 cache: 1) default to `dtype_bytes`."""
    c = config
    qkv = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    o = c.num_heads * c.head_dim * c.hidden_size
    if c.architecture == "gpt2":
        mlp = 2 * c.hidden_size * c.intermediate_size
        norms = 4 * c.hidden_size
        biases = 3 * c.hidden_size + c.hidden_size + c.intermediate_size + c.hidden_size
        extra = 2 * c.hidden_size  # final LayerNorm
    else:
        mlp = 3 * c.hidden_size * c.intermediate_size
        norms = 2 * c.hidden_size
        biases = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim if c.attention_bias else 0
        extra = c.hidden_size  # final RMSNorm
    lm_head = c.vocab_size * c.hidden_size
    projections = c.num_layers * (qkv + o + mlp) * (dtype_bytes if projection_bytes is None else projection_bytes)
    rest = (c.num_layers * (norms + biases) + extra + lm_head) * dtype_bytes
    kv = batch * context * c.kv_cache_bytes_per_block(1, dtype_bytes if kv_bytes is None else kv_bytes)
    return projections + rest + kv


def decode_projection_shapes(config: ModelConfig) -> list[tuple[int, int, bool]]:
    """(N, K, has bias) of every projection a decode step runs, the LM head included (its rows
    padded as the model pads them): the shapes the launch table is tuned for."""
    from engine.models.layers import padded_vocab_size

    c = config
    q_kv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    if c.architecture == "gpt2":
        shapes = [(3 * c.hidden_size, c.hidden_size, True), (c.hidden_size, c.hidden_size, True),
                  (c.intermediate_size, c.hidden_size, True), (c.hidden_size, c.intermediate_size, True)]
    else:
        shapes = [(q_kv, c.hidden_size, c.attention_bias), (c.hidden_size, c.num_heads * c.head_dim, False),
                  (2 * c.intermediate_size, c.hidden_size, False), (c.hidden_size, c.intermediate_size, False)]
    return shapes + [(padded_vocab_size(c.vocab_size), c.hidden_size, False)]
