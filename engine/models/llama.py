"""Llama family (Llama, Mistral, Qwen2-style GQA + RoPE) over the paged KV cache.

Parameter names follow HF's `LlamaForCausalLM`, except that q/k/v and
gate/up are stored fused (`qkv_proj`, `gate_up_proj`) to save launches;
`load_weights` maps HF names onto the fused shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.attention import KV_UNIT_SCALES, AttentionBackend, AttentionMetadata
from engine.config import ModelConfig
from engine.models.layers import (
    AddNorm,
    Fp8Linear,
    Fp8Rows,
    GGUFBlockLinear,
    ProjectionLaunches,
    VocabEmbedding,
    e4m3_rows,
    fused_kernel,
    padded_vocab_size,
    projection,
    uses_cpu_kernels,
    uses_fused_kernels,
)
from engine.parallel import SINGLE, TensorParallel


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = dict(config.rope_scaling or ())
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        # Llama 3.1: keep high frequencies, stretch low ones, blend in between.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(is_mid, blended, inv_freq)
    elif rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type != "default":
        raise ValueError(f"unsupported rope scaling {rope_type!r}")
    return inv_freq


class RotaryEmbedding(nn.Module):
    """HF-style (rotate-half) RoPE with a cos/sin table for every position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        half = config.head_dim // 2
        self.register_buffer("cos_half", torch.empty(config.max_position_embeddings, half), persistent=False)
        self.register_buffer("sin_half", torch.empty(config.max_position_embeddings, half), persistent=False)
        if self.cos_half.device.type != "meta":
            self.compute_buffers()

    @torch.no_grad()
    def compute_buffers(self) -> None:
        """Fill the tables where they live (the loader calls this once the model is on its device):
        angles in fp32, then cast to the tables' dtype (the model's, as HF casts cos/sin)."""
        device = self.cos_half.device
        t = torch.arange(self.config.max_position_embeddings, dtype=torch.float32, device=device)
        freqs = torch.outer(t, rope_inv_freq(self.config).to(device))
        # One angle per pair of dims; the rotate-half form repeats them across both halves.
        self.cos_half.copy_(freqs.cos())
        self.sin_half.copy_(freqs.sin())

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch path (HF's arithmetic, in the model dtype); CUDA fuses RoPE into the cache write."""
        cos = self.cos_half[positions].to(q.dtype).repeat(1, 2).unsqueeze(1)
        sin = self.sin_half[positions].to(q.dtype).repeat(1, 2).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    """This rank's heads: q/k/v column-parallel, o_proj row-parallel and summed across ranks."""

    def __init__(self, config: ModelConfig, attention: AttentionBackend, rotary: RotaryEmbedding,
                 tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.num_heads = tp.heads(config.num_heads)
        self.num_kv_heads = tp.kv_heads(config.num_kv_heads)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = projection(config.hidden_size, self.q_size + 2 * self.kv_size, config.linear_scheme("qkv_proj"),
                                   bias=config.attention_bias)
        self.o_proj = projection(self.q_size, config.hidden_size, config.linear_scheme("o_proj"), bias=False)
        self.attention = attention
        self.rotary = rotary
        self.scale = self.head_dim**-0.5
        # The Triton and CPU backends apply RoPE in the same call that writes K/V to the cache.
        self.rotary_in_attention = attention.fuses_rotary
        self.kv_scales = KV_UNIT_SCALES  # an fp8 cache's (k_scale, v_scale), calibrated by the runner

    def forward(self, x, positions, kv_cache, meta):
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.rotary_in_attention:
            rope = (positions, self.rotary.cos_half, self.rotary.sin_half)
            o = self.attention.forward(q, k, v, kv_cache, meta, self.scale, rope, kv_scales=self.kv_scales)
        else:
            q, k = self.rotary(positions, q, k)
            o = self.attention.forward(q, k, v, kv_cache, meta, self.scale, kv_scales=self.kv_scales)
        return self.tp.all_reduce(self.o_proj(o.reshape(qkv.shape[0], self.q_size)))


class LlamaMLP(nn.Module):
    """This rank's slice of the MLP: gate/up column-parallel, down row-parallel and summed."""

    def __init__(self, config: ModelConfig, fused: bool, cpu: bool = False, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.intermediate_size = config.intermediate_size // tp.size
        self.gate_up_proj = projection(config.hidden_size, 2 * self.intermediate_size,
                                       config.linear_scheme("gate_up_proj"), bias=False)
        self.down_proj = projection(self.intermediate_size, config.hidden_size, config.linear_scheme("down_proj"),
                                    bias=False)
        self.fused = fused  # the Triton kernel, which can write e4m3 rows
        self.act_kernel = fused_kernel("activation", "silu_and_mul") if fused else \
            fused_kernel("cpu_elementwise", "silu_mul") if cpu else None
        self.pdl = False  # set by configure_decode_kernels

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        fp8 = isinstance(self.down_proj, Fp8Linear)  # SiLU * up quantized as it is written
        if self.fused and fp8:
            act = e4m3_rows(gate_up.shape[0], self.intermediate_size, gate_up.device)
            self.act_kernel(gate_up, out=act.q, out_scale=act.scale, pdl=self.pdl)
        elif self.act_kernel is not None:
            act = self.act_kernel(gate_up, pdl=True) if self.pdl else self.act_kernel(gate_up)
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            act = F.silu(gate) * up
        if fp8 and not isinstance(act, Fp8Rows):
            act = Fp8Rows.of(act)
        return self.tp.all_reduce(self.down_proj(act))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionBackend, rotary: RotaryEmbedding,
                 tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        fused, cpu = uses_fused_kernels(attention), uses_cpu_kernels(attention)
        self.input_layernorm = AddNorm(config.hidden_size, config.norm_eps, rms=True, fused=fused, cpu=cpu)
        self.self_attn = LlamaAttention(config, attention, rotary, tp)
        self.post_attention_layernorm = AddNorm(config.hidden_size, config.norm_eps, rms=True, fused=fused, cpu=cpu)
        self.mlp = LlamaMLP(config, fused, cpu, tp)

    def forward(self, x, residual, positions, kv_cache, meta):
        """x: the previous sublayer's output, not yet added to `residual` (the add is fused into the norm)."""
        # FP8 projections take their inputs in e4m3 from the norms (Fp8Rows)
        h, residual = self.input_layernorm(x, residual, fp8=isinstance(self.self_attn.qkv_proj, Fp8Linear))
        h, residual = self.post_attention_layernorm(self.self_attn(h, positions, kv_cache, meta), residual,
                                                    fp8=isinstance(self.mlp.gate_up_proj, Fp8Linear))
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, attention: AttentionBackend, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(padded_vocab_size(config.vocab_size, tp.size), config.hidden_size, tp)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, attention, self.rotary, tp)
                                    for _ in range(config.num_layers))
        self.norm = AddNorm(config.hidden_size, config.norm_eps, rms=True, fused=uses_fused_kernels(attention),
                            cpu=uses_cpu_kernels(attention))


class LlamaForCausalLM(nn.Module):
    # HF name fragment -> (our fused parameter, shard index)
    _FUSED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, attention: AttentionBackend, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = LlamaModel(config, attention, tp)
        vocab_rows = padded_vocab_size(config.vocab_size, tp.size)
        if config.linear_scheme("lm_head") is not None:  # GGUF blocks (a tied embedding keeps a dense copy for lookups)
            assert tp.size == 1, "GGUF blocks are not split across ranks"
            self.lm_head = GGUFBlockLinear(config.hidden_size, vocab_rows, config.linear_scheme("lm_head"))
        else:  # this rank's rows of the vocabulary
            self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, vocab_rows // tp.size,
                                                                             bias=False)
        self.lm_head_projection = ProjectionLaunches()

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        decode_layers = self._cpu_decode_layers(kv_caches) if meta.is_decode_only else None
        if decode_layers is not None:
            x, residual = decode_layers(x, positions, meta)
            return self.model.norm(x, residual)[0]
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, positions, kv_cache, meta)
        return self.model.norm(x, residual)[0]

    def _cpu_decode_layers(self, kv_caches: list[torch.Tensor]):
        """On the CPU default path (C++ attention and norms, every projection in GGUF blocks, one
        rank), a decode step's layers as one C++ call (roseinfer_kernels/cpu_layers.py): a function of (x,
        positions, meta), built on first use; else None."""
        cached = self.__dict__.get("_decode_layers_call")
        if cached is not None and cached[0] is kv_caches:
            return cached[1]
        call = None
        layers = list(self.model.layers)
        attn = layers[0].self_attn
        projections = [(l.self_attn.qkv_proj, l.self_attn.o_proj, l.mlp.gate_up_proj, l.mlp.down_proj) for l in layers]
        if (self.tp.size == 1 and attn.attention.name == "cpu" and not self.config.attention_bias
                and all(isinstance(p, GGUFBlockLinear) and p.bias is None for ps in projections for p in ps)
                and len({tuple(p.scheme for p in ps) for ps in projections}) == 1
                and all(l.input_layernorm.cpu_kernel is not None for l in layers)):
            from roseinfer_kernels.cpu_layers import decode_layers

            tensors = [[l.input_layernorm.weight, ps[0].weight, ps[1].weight, l.post_attention_layernorm.weight,
                        ps[2].weight, ps[3].weight, kv] for l, ps, kv in zip(layers, projections, kv_caches)]
            q4_1 = [p.scheme == "q4_1" for p in projections[0]]
            rotary, eps, mlp = self.model.rotary, layers[0].input_layernorm.eps, layers[0].mlp

            def call(x, positions, meta):
                return decode_layers(x, tensors, q4_1, meta.slot_mapping, positions, rotary.cos_half, rotary.sin_half,
                                     meta.block_tables, meta.seq_lens, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                     mlp.intermediate_size, eps, attn.scale)
        self.__dict__["_decode_layers_call"] = (kv_caches, call)
        return call

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Logits over the real vocabulary; fp32 for the sampler unless `upcast` is False
        (argmax needs no copy: the fp32 values are exact conversions)."""
        if isinstance(self.lm_head, GGUFBlockLinear):
            logits = self.lm_head(hidden)
        else:  # each rank's vocabulary rows, side by side
            logits = self.tp.gather_columns(self.lm_head_projection(hidden, self.lm_head_weight(), None))
        logits = logits[:, : self.config.vocab_size]
        return logits.float() if upcast else logits

    def _shard_sizes(self, fused: str) -> list[int]:
        c, tp = self.config, self.tp
        if fused == "qkv_proj":
            kv = tp.kv_heads(c.num_kv_heads) * c.head_dim
            return [tp.heads(c.num_heads) * c.head_dim, kv, kv]
        return [c.intermediate_size // tp.size] * 2

    def rank_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the HF tensor `name` (all of it on one rank). `tensor` may be a
        checkpoint tensor not read yet (engine.loader), which reads only the part indexed."""
        c, tp = self.config, self.tp
        if tp.size == 1:
            return tensor
        if name.endswith("_scale") and (tensor.dim() == 0 or ".o_proj." in name or ".down_proj." in name):
            return tensor  # one scale for the whole tensor, or per output row of a row-parallel one
        d = c.head_dim
        q_first, q_end = tp.head_range(c.num_heads)
        if ".q_proj." in name:
            return tensor[q_first * d:q_end * d]
        if ".k_proj." in name or ".v_proj." in name:
            kv_first, kv_end = tp.kv_head_range(c.num_kv_heads)
            return tensor[kv_first * d:kv_end * d]
        if ".o_proj." in name:
            return tensor[:, q_first * d:q_end * d]
        mlp_first, mlp_end = tp.split(c.intermediate_size)
        if ".gate_proj." in name or ".up_proj." in name:
            return tensor[mlp_first:mlp_end]
        if ".down_proj." in name:
            return tensor[:, mlp_first:mlp_end]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # the same vocabulary rows for both
            embed, rows = self.model.embed_tokens, tensor.shape[0]
            return tensor[min(embed.first_row, rows):min(embed.end_row, rows)]  # the last ranks may hold only padding
        return tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], presliced: bool = False) -> set[str]:
        """Copy HF Llama tensors in, filling fused q/k/v and gate/up shards. `presliced`: each
        tensor is already this rank's part (`rank_slice` applied as it was read)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or name.endswith(".input_scale"):
                continue  # activations are scaled per token at run time, not by a stored scale
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding serves as the LM head
            target, shard = name, None
            for hf, (fused, idx) in self._FUSED.items():
                if f".{hf}." in name:
                    target, shard = name.replace(hf, fused), idx
                    break
            if target not in params:
                raise KeyError(f"unexpected Llama weight {name!r}")
            if not presliced:
                tensor = self.rank_slice(name, tensor)
            param = params[target]
            if shard is None:
                if target.endswith("weight_scale"):  # FP8 checkpoints: per row ([N] or [N, 1]) or one scalar
                    tensor = tensor.reshape(-1).expand(param.shape[0])
                param.data[: tensor.shape[0]].copy_(tensor)  # embeddings / lm_head have padding rows
            else:
                sizes = self._shard_sizes(target.split(".")[-2])
                offset = sum(sizes[:shard])
                if target.endswith("weight_scale"):
                    tensor = tensor.reshape(-1).expand(sizes[shard])
                param.data[offset:offset + sizes[shard]].copy_(tensor)
            loaded.add(f"{target}#{shard}" if shard is not None else target)
        return loaded


def to_hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under HF `LlamaForCausalLM` names (fused q/k/v and gate/up split back)."""
    out = {}
    unfused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, p in model.named_parameters():
        t = p.detach()
        fused = next((f for f in unfused if f".{f}." in name), None)
        if fused is None:
            out[name] = t[: model.config.vocab_size] if name in ("model.embed_tokens.weight", "lm_head.weight") else t
            continue
        for part, shard in zip(unfused[fused], t.split(model._shard_sizes(fused), dim=0)):
            out[name.replace(fused, part)] = shard.contiguous()
    if model.lm_head is None:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
