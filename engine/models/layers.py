"""Layers both model families share: the residual add fused into the next norm, and linear
projections that run the skinny decode kernel on small batches."""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from roseinfer_kernels.fp8 import quantize_rows_fp8, quantize_tokens_fp8, scaled_mm_fp8, scaled_mm_prequantized


def padded_vocab_size(vocab_size: int, shards: int = 1) -> int:
    """Rows of the embedding / LM-head matrix: a multiple of 64 (of 64 per tensor-parallel shard),
    so cuBLAS picks its aligned (fast) kernels for the logits GEMM; logits past the real
    vocabulary are sliced off."""
    unit = 64 * shards
    return -(-vocab_size // unit) * unit


class VocabEmbedding(nn.Module):
    """The token embedding, its rows split across tensor-parallel ranks: each rank looks up the ids
    in its slice (zeros elsewhere) and the ranks' rows are summed. One rank: a plain lookup."""

    def __init__(self, vocab_rows: int, hidden_size: int, tp) -> None:
        super().__init__()
        self.tp = tp
        self.first_row, self.end_row = tp.split(vocab_rows)
        self.weight = nn.Parameter(torch.empty(self.end_row - self.first_row, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.first_row
        mine = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(rows)


class Fp8Rows(NamedTuple):
    """Activations in float8 e4m3 with one fp32 scale per row (rows ~= q * scale[:, None]), as a
    norm or SiLU * up hands them to the FP8 projection after it: quantized in the kernel that
    writes them, so the projection multiplies e4m3 by e4m3 with no quantizing pass of its own."""

    q: torch.Tensor  # [rows, features] float8_e4m3fn
    scale: torch.Tensor  # [rows] float32

    @classmethod
    def of(cls, rows: torch.Tensor) -> Fp8Rows:
        """The paths without a fused kernel (torch, the CPU): quantized after the fact, alike."""
        q, scale = quantize_tokens_fp8(rows)
        return cls(q, scale.view(-1))


def e4m3_rows(rows: int, features: int, device: torch.device) -> Fp8Rows:
    return Fp8Rows(torch.empty(rows, features, dtype=torch.float8_e4m3fn, device=device),
                   torch.empty(rows, dtype=torch.float32, device=device))


class AddNorm(nn.Module):
    """`norm(x + residual)` and the new residual stream `x + residual` (x alone when residual is None).

    LayerNorm (weight and bias, GPT-2) or RMSNorm (weight, Llama); parameter names match HF's.
    `fused` runs one Triton kernel (the CUDA path), `cpu` one C++ call for RMSNorm (the CPU
    backend's); otherwise plain torch with HF's rounding.
    """

    def __init__(self, hidden_size: int, eps: float, rms: bool, fused: bool, cpu: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = None if rms else nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps
        self.rms = rms
        self.kernel = fused_kernel("norm", "add_norm") if fused else None
        self.cpu_kernel = fused_kernel("cpu_elementwise", "add_rms_norm") if cpu and rms else None
        self.pdl = False  # set by configure_decode_kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                fp8: bool = False) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        """`fp8`: the normed rows as Fp8Rows, for the FP8 projection that takes them."""
        if self.kernel is not None and fp8:
            rows = e4m3_rows(x.shape[0], x.shape[1], x.device)
            _, summed = self.kernel(x, residual, self.weight, self.bias, self.eps, self.rms, out=rows.q,
                                    out_scale=rows.scale, pdl=self.pdl)
            return rows, summed
        if fp8:
            normed, summed = self.forward(x, residual)
            return Fp8Rows.of(normed), summed
        if self.kernel is not None:
            return self.kernel(x, residual, self.weight, self.bias, self.eps, self.rms, pdl=self.pdl)
        if self.cpu_kernel is not None:
            return self.cpu_kernel(x, residual, self.weight, self.eps)
        h = x if residual is None else x + residual
        if not self.rms:
            return F.layer_norm(h, (h.shape[-1],), self.weight, self.bias, self.eps), h
        h32 = h.float()
        normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(h.dtype), h


def uses_fused_kernels(attention) -> bool:
    """The Triton attention backend brings the other Triton kernels with it (norms, RoPE, SiLU)."""
    return attention.name == "triton"


def uses_cpu_kernels(attention) -> bool:
    """The CPU attention backend brings the C++ RMSNorm and SiLU * up with it."""
    return attention.name == "cpu"


def fused_kernel(module: str, name: str):
    """A launcher from `roseinfer_kernels/`, imported only when used: the torch path needs no Triton."""
    return getattr(importlib.import_module(f"roseinfer_kernels.{module}"), name)


class ProjectionLaunches:
    """How one projection runs at each batch size: the skinny decode kernel with the launch decided
    for its batch bucket (by `configure_decode_kernels`, once), cuBLAS above the largest bucket
    that has one. Unconfigured (the CPU path), always plain torch."""

    def __init__(self) -> None:
        self.launches: list[tuple[int, object]] = []  # (max rows, LinearLaunch) ascending
        self.kernel = None
        self.workspace = None

    def launch_for(self, rows: int):
        """The skinny kernel's launch for a batch of `rows`, or None (cuBLAS, or not configured)."""
        for max_rows, launch in self.launches:
            if rows <= max_rows:
                return launch
        return None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
        launch = self.launch_for(x.shape[0])
        if launch is not None:
            return self.kernel(x, weight, bias, gelu, launch, self.workspace)
        y = F.linear(x, weight, bias)
        return F.gelu(y, approximate="tanh") if gelu else y


class GGUFBlockLinear(nn.Module):
    """A projection whose weight stays in GGUF blocks (Q4_1 or Q8_0), run by
    `roseinfer_kernels.gguf_linear` on the CPU: the bytes a decode step reads are the file's 4.5 or 8.5
    bits a weight, and the weights are exactly the ones dequantisation gives. `weight` holds the
    blocks, [out_features, in_features / 32 * block bytes] uint8, rows in output order (so fused
    projections concatenate rows, as dense ones do)."""

    def __init__(self, in_features: int, out_features: int, scheme: str, bias: bool = False) -> None:
        super().__init__()
        row_bytes = fused_kernel("gguf_linear", "row_bytes")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.weight = nn.Parameter(torch.zeros(out_features, row_bytes(in_features, scheme), dtype=torch.uint8),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.kernel = fused_kernel("gguf_linear", "gguf_linear")  # looked up once, not per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.out_features, self.in_features, self.scheme, self.bias)


class Fp8Linear(nn.Module):
    """A projection with float8 e4m3 weights (a scale per output channel).

    Activations in the model dtype (o_proj's, GPT-2's): batches the skinny decode kernel serves (on
    CUDA, the batch buckets where `configure_decode_kernels` finds it the choice for this shape)
    read the weights at a byte each and widen them in registers (W8A16); larger batches, and the
    CPU, quantize the activations per token and multiply with `torch._scaled_mm` (cuBLASLt's FP8
    GEMM on Hopper; torch's reference kernel on the CPU). Where the launch table measured it
    faster (`quantize_first`), they are quantized first in one launch and go the e4m3 way below.
    Activations as Fp8Rows (the Llama norms' and SiLU's, quantized as they were written): e4m3 by
    e4m3, through the skinny kernel where `prequantized` has a launch for the batch, else
    `torch._scaled_mm` on them as they are. Bias and tanh-GELU (GPT-2's MLP) follow in the model dtype."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False,
                 act_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.reshape(-1).float(), requires_grad=False)  # [N], per output row
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.gelu = gelu
        self.act_dtype = act_dtype  # the model's: what the projection returns
        self.projection = ProjectionLaunches()
        self.prequantized = ProjectionLaunches()  # the launches for Fp8Rows inputs
        # (bucket, quantize first?, then the launch or None for cuBLASLt) ascending, from the launch
        # table's measurements (configure_decode_kernels): whether an input in the model dtype is
        # quantized first (roseinfer_kernels.fp8_rows.quantize_rows) and multiplied e4m3 by e4m3
        self.quantize_first: list[tuple[int, bool, object]] = []
        self.quantize_rows = None  # that kernel's launcher, with the PDL setting, where any bucket does

    @classmethod
    def from_dense(cls, linear: nn.Linear, gelu: bool = False) -> Fp8Linear:
        q, scale = quantize_rows_fp8(linear.weight.detach())
        return cls(q, scale, None if linear.bias is None else linear.bias.detach(), gelu, linear.weight.dtype)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        if isinstance(x, Fp8Rows):
            return self._e4m3_product(x, self.prequantized.launch_for(x.q.shape[0]))
        rows = x.shape[0]
        first, launch = next(((first, launch) for bucket, first, launch in self.quantize_first if rows <= bucket),
                             (False, None))
        if first:
            return self._e4m3_product(Fp8Rows(*self.quantize_rows(x)), launch)
        launch = self.projection.launch_for(rows)
        if launch is not None:
            return self.projection.kernel(x, self.weight, self.bias, self.gelu, launch, self.projection.workspace,
                                          weight_scale=self.weight_scale)
        return self._epilogue(scaled_mm_fp8(x, self.weight, self.weight_scale))

    def _e4m3_product(self, x: Fp8Rows, launch) -> torch.Tensor:
        """e4m3 rows by e4m3 weights: the skinny kernel's `launch`, or cuBLASLt when None."""
        rows = x.q.shape[0]
        if launch is not None:
            out = torch.empty(rows, self.out_features, dtype=self.act_dtype, device=x.q.device)
            return self.prequantized.kernel(x.q, self.weight, self.bias, self.gelu, launch, self.prequantized.workspace,
                                            out=out, weight_scale=self.weight_scale, x_scale=x.scale)
        return self._epilogue(scaled_mm_prequantized(x.q, x.scale, self.weight, self.weight_scale, self.act_dtype))

    def _epilogue(self, y: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias
        return F.gelu(y, approximate="tanh") if self.gelu else y


def quantize_projections_fp8(model: nn.Module) -> int:
    """Replace every dense decode projection (q/k/v, o, the MLP's) with its Fp8Linear, in place;
    the embedding and the LM head keep the model dtype. Returns how many were replaced. (Before
    an FP8 checkpoint loads, this turns the zeroed projections into FP8 ones its tensors fill.)"""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DecodeLinear):
                setattr(parent, name, Fp8Linear.from_dense(child, gelu=child.gelu))
                replaced += 1
    return replaced


def projection(in_features: int, out_features: int, scheme: str | None, bias: bool = True,
               gelu: bool = False) -> nn.Module:
    """A decode projection: GGUF blocks when the model keeps this one in `scheme`, else dense."""
    if scheme is None:
        return DecodeLinear(in_features, out_features, bias=bias, gelu=gelu)
    assert not gelu, "GGUF blocks serve the Llama family only"
    return GGUFBlockLinear(in_features, out_features, scheme, bias=bias)


class DecodeLinear(nn.Linear):
    """`nn.Linear` (optionally followed by tanh-GELU, GPT-2's MLP) whose small-batch calls run
    `roseinfer_kernels.linear.skinny_linear` with the bias and GELU in its epilogue, as `projection` decides."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gelu: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.gelu = gelu
        self.projection = ProjectionLaunches()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x, self.weight, self.bias, self.gelu)


def configure_decode_kernels(model: nn.Module, attention, device: torch.device, dtype: torch.dtype,
                             max_rows: int) -> None:
    """Decide, once at load, how the fused kernels launch: programmatic dependent launch where the
    GPU has it (every kernel of a layer is then ours, so each can start while the one before it
    ends), and the launch of every projection, the LM head included (`model.lm_head_projection`
    over `model.lm_head_weight()`), for each batch bucket up to `max_rows`: the skinny kernel's
    from the launch table, or cuBLAS. Only for the CUDA path (the Triton attention backend)."""
    from roseinfer_kernels.launch_table import (BATCH_BUCKETS, batch_bucket, has_linear_entry, linear_launch,
                                                prequantized_linear_launch, quantize_first_launch)
    from roseinfer_kernels.linear import SplitKWorkspace, skinny_linear, workspace_size
    from roseinfer_kernels.pdl import pdl_supported

    pdl = pdl_supported(device)
    attention.pdl = pdl
    workspace = SplitKWorkspace()
    need = (0, 0)
    dtype_name = str(dtype).removeprefix("torch.")
    buckets = [b for b in BATCH_BUCKETS if b <= batch_bucket(max_rows)]

    def configure(projection: ProjectionLaunches, n: int, k: int, heuristic: bool = True, fp8: bool = False,
                  prequantized: bool = False) -> None:
        nonlocal need
        projection.launches = []
        for bucket in buckets:
            # fp8 weights: their own measured launches where roseinfer_kernels/tune.py --weights fp8 wrote some,
            # else the model dtype's for the shape (half the bytes through the same tiles)
            table_dtype = "float8_e4m3fn" if fp8 and has_linear_entry("float8_e4m3fn", n, k, bucket) else dtype_name
            if prequantized:
                launch = prequantized_linear_launch(n, k, bucket)
            else:
                launch = linear_launch(table_dtype, n, k, bucket, heuristic=heuristic)
            if launch is None:
                break  # cuBLAS from here up
            launch = dataclasses.replace(launch, pdl=pdl)
            projection.launches.append((bucket, launch))
            need = tuple(map(max, need, workspace_size(launch, bucket, n)))
        projection.kernel = skinny_linear
        projection.workspace = workspace

    for module in model.modules():
        if hasattr(module, "pdl"):  # AddNorm, the Llama attention's RoPE, its MLP's SiLU
            module.pdl = pdl
        elif isinstance(module, (DecodeLinear, Fp8Linear)):
            configure(module.projection, module.out_features, module.in_features, fp8=isinstance(module, Fp8Linear))
            if isinstance(module, Fp8Linear):
                configure(module.prequantized, module.out_features, module.in_features, prequantized=True)
                module.quantize_first = []
                for bucket in buckets:
                    first, launch = quantize_first_launch(module.out_features, module.in_features, bucket)
                    if launch is not None:
                        launch = dataclasses.replace(launch, pdl=pdl)
                        need = tuple(map(max, need, workspace_size(launch, bucket, module.out_features)))
                    module.quantize_first.append((bucket, first, launch))
                if any(first for _, first, _ in module.quantize_first):
                    module.quantize_rows = functools.partial(fused_kernel("fp8_rows", "quantize_rows"), pdl=pdl)
    lm_head = model.lm_head_weight()
    # The LM head keeps cuBLAS unless the table holds a measured launch for its shape.
    configure(model.lm_head_projection, lm_head.shape[0], lm_head.shape[1], heuristic=False)
    if need[0]:
        # Allocated now, not lazily inside a CUDA-graph capture.
        workspace.get(need[0], need[1], device)
