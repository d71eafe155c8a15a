"""The engine's one configuration object and the model's architecture config."""

from __future__ import annotations

from dataclasses import dataclass, field

# One log line format for every roseinfer process (the CLI, API processes, the engine process).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, built once from CLI flags or keyword arguments."""

    model: str = "smollm2-135m-instruct"
    load_format: str = "auto"  # auto | dummy
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda
    tokenizer: str | None = None  # override: a tokenizer.json, a directory, or a .gguf
    seed: int = 0
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # KV-cache sizing: an explicit byte count wins; else a block count; else on
    # CUDA a fraction of free memory, on the CPU a default byte count.
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    attention_backend: str = "auto"  # auto | torch | triton
    enforce_eager: bool = False
    # Decode steps run back to back on the device before the host looks at the tokens
    # (only for pure decode batches with nobody waiting; CUDA graphs only).
    num_scheduler_steps: int = 8
    cuda_graph_batch_sizes: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256))

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.block_size not in (8, 16, 32, 64):
            raise ValueError("block_size must be 8, 16, 32 or 64")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a loaded model (GPT-2 or Llama family)."""

    architecture: str  # "gpt2" | "llama"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, object], ...] | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    hidden_act: str = "silu"

    def kv_cache_bytes_per_block(self, block_size: int, dtype_bytes: int) -> int:
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * dtype_bytes
