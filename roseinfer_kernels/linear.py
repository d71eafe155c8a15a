"""Skinny linear layer for decode: y = act(x @ W^T + b) for few rows (the batch), in one launch.

At decode the activations are a handful of rows and the weight matrix is the
only traffic, so a linear layer is a bandwidth problem with a latency floor.
On the H100, cuBLAS moves GPT-2's projections at batch 64 at 0.3-0.9 TB/s,
splits fc2's K into a second reduction launch, and the MLP's GELU is another
launch (docs/BENCHMARKS.md, third session). Here one program owns a [BLOCK_M, BLOCK_N] tile of the output
(and, with SPLIT_K > 1, one slice of K): slices write fp32 partials to a
workspace, and the last slice to finish a tile (counted with an atomic) sums
them and runs the epilogue (bias, then tanh-GELU if asked). The counter is
reset by that last slice, so the kernel can be replayed in a CUDA graph.

Launch parameters come from `roseinfer_kernels.launch_table` per (N, K, batch bucket),
decided once when the decode graphs are captured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from roseinfer_kernels.pdl import pdl_launch, wait_for_previous_kernel


@dataclass(frozen=True)
class LinearLaunch:
    """Launch parameters of the skinny linear kernel; `pdl` launches it with programmatic dependent
    launch (Hopper+), so it starts, and pulls its weights into L2, while the previous kernel ends."""

    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = False
    # float8 weights only: quantise each BLOCK_K slice of the activations to e4m3 (a scale per row
    # and slice) and multiply fp8 x fp8 on the tensor cores (W8A8), instead of widening the weights
    # to the activations' dtype in registers (W8A16), which bounds how fast the weights stream.
    act_fp8: bool = False
    # Weight tiles through the Tensor Memory Accelerator (a TensorDescriptor over the weight; Hopper
    # and newer): one instruction a tile instead of per-thread address arithmetic and cp.async, a
    # candidate for streaming nearer the copy rate (the projections run at 2-3 TB/s of 4.2 on the
    # H200). block_k <= 256 (a TMA box is at most 256 elements a side).
    tma: bool = False
    # One row (batch 1) as a matrix-vector product: weight tiles multiplied into a register tile of
    # fp32 products with FMAs and summed over K once, after the loop, instead of a tensor-core tile
    # of 16 rows (15 of them padding) fed through shared memory. cuBLAS's batch-1 GEMV streamed the
    # 8B's qkv and o_proj at 2.6-2.9 TB/s of 4.2 on the H200, and the tensor-core launches no
    # faster. block_n * block_k / (32 * num_warps) fp32 products a thread: keep it at 64 or less.
    gemv: bool = False


@triton.jit
def _epilogue_store(acc, s_ptr, xs_ptr, b_ptr, y_ptr, rm, rn, stride_ym, tile_mask, m_mask, n_mask,
                    W_SCALED: tl.constexpr, X_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
    if X_SCALED:  # float8 activations: each row's scale
        acc *= tl.load(xs_ptr + rm, mask=m_mask, other=0.0)[:, None]
    if W_SCALED:  # float8 weights: each output channel's scale
        acc *= tl.load(s_ptr + rn, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        # HF rounds the projection to the model dtype before its GELU; so do we (greedy parity)
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        # tanh-GELU as x * sigmoid(2u): tanh(u) = 2 sigmoid(2u) - 1; 0.79788... = sqrt(2 / pi)
        u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        acc = acc / (1.0 + tl.exp(-2.0 * u))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _dot_e4m3(x, w, DOT_FP32: tl.constexpr):
    """x [M, K] @ w [N, K]^T, both float8 e4m3, accumulated in fp32 (under the interpreter in fp32
    arithmetic, where e4m3 products are exact)."""
    if DOT_FP32:
        part = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        part = tl.dot(x, tl.trans(w))
    return part


@triton.jit
def _widened_f32(t, E4M3_ASM: tl.constexpr):
    """A tile in fp32 for the gemv path's FMAs; `E4M3_ASM`: e4m3 values through widen_e4m3 (to bf16,
    which holds every e4m3 value exactly, then fp32: a shift) rather than `.to`'s conversions."""
    if E4M3_ASM:
        t = widen_e4m3(t, tl.bfloat16)
    return t.to(tl.float32)


def _widen_e4m3_asm(shift: int, keep: int, power: int, fma: str) -> str:
    """PTX for `widen_e4m3`: four e4m3 bytes in $2 -> two registers of two 16-bit values each."""
    half = (  # one register's two values: its bytes in the halves' high bytes -> the target format
        "shr.b32 em, {r}, %d;\nand.b32 em, em, %#010x;\nand.b32 {r}, {r}, 0x80008000;\nor.b32 {r}, {r}, em;\n"
        "%s {out}, {r}, pow, nz;\n" % (shift, keep, fma))
    return ("{\n.reg .b32 lo, hi, em, pow, nz;\n"
            "mov.b32 pow, %#010x;\n" % power +
            "mov.b32 nz, 0x80008000;\n"  # -0.0 twice: the FMA's addend (x * 2^k + -0 == x * 2^k, signs kept)
            "prmt.b32 lo, $2, 0, 0x1404;\n"  # bytes 0 and 1 into the high bytes of the two halves
            "prmt.b32 hi, $2, 0, 0x3424;\n" +  # bytes 2 and 3
            half.format(r="lo", out="$0") + half.format(r="hi", out="$1") + "}")


# bf16: exponent and mantissa shifted down by 4, times 2^120 (0x7B80); fp16: by 1, times 2^8 (0x5C00)
_WIDEN_E4M3_TO_BF16 = tl.constexpr(_widen_e4m3_asm(4, 0x07F007F0, 0x7B807B80, "fma.rn.bf16x2"))
_WIDEN_E4M3_TO_FP16 = tl.constexpr(_widen_e4m3_asm(1, 0x3F803F80, 0x5C005C00, "fma.rn.f16x2"))


@triton.jit
def widen_e4m3(w, DTYPE: tl.constexpr):
    """float8 e4m3 values -> DTYPE (bf16 or fp16), exactly, with integer ops and one packed FMA per
    two values instead of the conversion instructions `w.to(DTYPE)` compiles to (e4m3 -> f16x2,
    then f16 -> f32 -> bf16), whose issue rate bounds the skinny kernel's weight stream on Hopper
    at about 2.5 TB/s of fp8 (docs/BENCHMARKS.md). CUDA only (inline PTX).

    Four bytes come in one register. `prmt` puts each into the high byte of a 16-bit half (sign at
    bit 15, the 4 exponent and 3 mantissa bits at 14..8); a shift moves the exponent and mantissa
    down into the low exponent bits and top mantissa bits of DTYPE (by 4 for bf16, by 1 for fp16),
    a mask keeps the sign; the value is then the e4m3 value times 2^-120 (bf16: exponent bias 127
    against e4m3's 7) or 2^-8 (fp16: 15 against 7), which one multiply by the power of two puts
    right, subnormals included. Zero stays zero; the NaN codes do not stay NaN (quantisation
    clamps to the finite range, so weights hold none)."""
    if DTYPE == tl.bfloat16:
        out = tl.inline_asm_elementwise(_WIDEN_E4M3_TO_BF16, "=r,=r,r", [w.to(tl.uint8, bitcast=True)],
                                        dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        out = tl.inline_asm_elementwise(_WIDEN_E4M3_TO_FP16, "=r,=r,r", [w.to(tl.uint8, bitcast=True)],
                                        dtype=tl.float16, is_pure=True, pack=4)
    return out


# M (the batch) stays specialised (1, multiples of 16): every M the engine launches with on CUDA is
# a captured graph's (decode batch sizes, mixed-step token buckets), compiled at capture, and
# turning specialisation off cost the seed benchmark about 3% (same-call A/B, docs/BENCHMARKS.md).
@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, w_desc, s_ptr, xs_ptr, b_ptr, y_ptr, ws_ptr, count_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym,
    W_SCALED: tl.constexpr, X_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    ACT_FP8: tl.constexpr, WIDEN_ASM: tl.constexpr, W_TMA: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH_LINES: tl.constexpr, LINE_ELEMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GEMV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)

    if USE_PDL:
        # The weights do not depend on the previous kernel: ask for this program's slice now, one
        # L2 prefetch per 128-byte line, so the loop below finds it in L2 instead of HBM.
        line = tl.minimum(k_start + tl.arange(0, PREFETCH_LINES) * LINE_ELEMS, k_end - 1)
        lines = w_ptr + rn[:, None] * stride_wn + line[None, :]
        lines = tl.where(n_mask[:, None], lines, w_ptr)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [lines],
                                  dtype=tl.int32, is_pure=False, pack=1)
    wait_for_previous_kernel(USE_PDL)  # the previous kernel's writes (our x) are visible from here on

    if GEMV:  # BLOCK_M == 1: the products, summed over K after the loop
        products = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < k_end
        if GEMV:  # x's slice in the weight tile's shape (each thread's own copy, from L1): a load in the
            # tile's layout, where a [1, BLOCK_K] load went through shared memory every iteration
            x = tl.load(x_ptr + pid_m * stride_xm + (kk[None, :] + 0 * rn[:, None]), mask=k_mask[None, :], other=0.0)
        else:
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if W_TMA:  # past the matrix's edges the tile reads zeros; a split's K range is whole tiles
            w = w_desc.load([pid_n * BLOCK_N, k0])
        else:
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if GEMV:
            products += _widened_f32(w, W_SCALED and WIDEN_ASM) * x.to(tl.float32)
        elif X_SCALED:  # x arrived in e4m3 with a scale per row (quantized once, by the kernel before)
            acc += _dot_e4m3(x, w, DOT_FP32)
        elif ACT_FP8:  # W8A8: this slice of x in e4m3, one scale per row (as roseinfer_kernels.fp8.fake_quantize_slices_fp8)
            xf = x.to(tl.float32)
            # IEEE divisions once a row, then products: as roseinfer_kernels.fp8.quantize_tokens_fp8 (values
            # that land on a rounding tie round alike; `/` here is not IEEE-rounded)
            amax = tl.maximum(tl.max(tl.abs(xf), axis=1), 1e-12)
            fp8_max = tl.full([BLOCK_M], 448.0, tl.float32)
            x_scale = tl.math.div_rn(amax, fp8_max)
            inv = tl.math.div_rn(fp8_max, amax)
            xq = tl.clamp(xf * inv[:, None], -448.0, 448.0).to(tl.float8e4nv)
            acc += _dot_e4m3(xq, w, DOT_FP32) * x_scale[:, None]
        else:
            if W_SCALED:  # float8 weights, widened in registers: the bytes read are a byte a weight
                if WIDEN_ASM:
                    w = widen_e4m3(w, x_ptr.dtype.element_ty)
                else:
                    w = w.to(x_ptr.dtype.element_ty)
            if DOT_FP32:  # the interpreter's bf16 dot is wrong (see roseinfer_kernels/paged_attention.py)
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:  # fp32 inputs: full precision, not TF32
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))

    if GEMV:
        acc = tl.sum(products, axis=1)[None, :]
    tile_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        _epilogue_store(acc, s_ptr, xs_ptr, b_ptr, y_ptr, rm, rn, stride_ym, tile_mask, m_mask, n_mask,
                            W_SCALED, X_SCALED, HAS_BIAS, GELU)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        m_pad = tl.num_programs(1) * BLOCK_M
        tl.store(ws_ptr + (pid_k * m_pad + rm[:, None]) * N + rn[None, :], acc, mask=tile_mask)
        tl.debug_barrier()  # every thread's partial is written before the program announces it
        done = tl.atomic_add(count_ptr + tile, 1)  # acq_rel: the last slice sees every partial
        if done == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(ws_ptr + (s * m_pad + rm[:, None]) * N + rn[None, :], mask=tile_mask, other=0.0,
                               cache_modifier=".cg")
            _epilogue_store(acc, s_ptr, xs_ptr, b_ptr, y_ptr, rm, rn, stride_ym, tile_mask, m_mask, n_mask,
                            W_SCALED, X_SCALED, HAS_BIAS, GELU)
            tl.atomic_xchg(count_ptr + tile, 0)  # ready for the next launch (graph replay)


class SplitKWorkspace:
    """fp32 partials and per-tile counters for split-K launches, grown on demand and reused.

    The counters start at zero and every launch leaves them at zero, so the same buffers serve
    every layer and every graph replay (launches on one stream never overlap)."""

    def __init__(self) -> None:
        self.partials: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None

    def get(self, partial_elems: int, tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.partials is None or self.partials.numel() < partial_elems or self.partials.device != device:
            self.partials = torch.empty(partial_elems, dtype=torch.float32, device=device)
        if self.counters is None or self.counters.numel() < tiles or self.counters.device != device:
            self.counters = torch.zeros(tiles, dtype=torch.int32, device=device)
        return self.partials, self.counters


def tile_rows(rows: int, launch: LinearLaunch | None = None) -> int:
    """Rows a program covers: the batch up to 64, at least one 16-row tensor-core tile; one for a
    `gemv` launch."""
    if launch is not None and launch.gemv:
        return 1
    return max(16, min(64, triton.next_power_of_2(rows)))


def workspace_size(launch: LinearLaunch, rows: int, n: int) -> tuple[int, int]:
    """(fp32 partial elements, counters) a split-K launch over `rows` x `n` needs."""
    if launch.split_k == 1:
        return 0, 0
    block_m = tile_rows(rows, launch)
    m_tiles = triton.cdiv(rows, block_m)
    return launch.split_k * m_tiles * block_m * n, triton.cdiv(n, launch.block_n) * m_tiles


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
    launch: LinearLaunch = LinearLaunch(),
    workspace: SplitKWorkspace | None = None,
    out: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias [N], then tanh-GELU if `gelu`; M is small (a decode batch).
    A float8 e4m3 weight comes with `weight_scale` [N] fp32 (weight ~= q * scale per output row):
    it is read at a byte a weight and widened to x's dtype in registers (no activation scaling), or,
    with `launch.act_fp8`, multiplied with x quantised to e4m3 a BLOCK_K slice at a time. x may also
    come in e4m3 already, with `x_scale` [M] fp32 (x ~= q * scale per row, as
    roseinfer_kernels.fp8.quantize_tokens_fp8 or a norm's fp8 output gives it): fp8 x fp8 products
    with no quantizing in the loop; `out` then says the output dtype."""
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1]
    assert x.stride(1) == 1 and weight.stride(1) == 1, "rows must be contiguous"
    scaled = weight.dtype == torch.float8_e4m3fn
    x_scaled = x.dtype == torch.float8_e4m3fn
    assert not x_scaled or (scaled and x_scale is not None and x_scale.shape == (x.shape[0],) and out is not None
                            and not launch.act_fp8), "e4m3 activations: e4m3 weights, a scale per row and `out`"
    assert (scaled and weight_scale is not None and weight_scale.shape == (weight.shape[0],)) or \
        (not scaled and weight_scale is None and x.dtype == weight.dtype)
    assert bias is None or (bias.shape == (weight.shape[0],) and bias.is_contiguous())
    # (tensor-core tiles are 16 rows of the weight or more; a gemv launch's rows are the warps' own)
    assert launch.block_n % (4 if launch.gemv else 16) == 0 and launch.block_k % 16 == 0 and launch.split_k >= 1
    assert scaled or not launch.act_fp8, "act_fp8 is for float8 weights"
    assert not launch.gemv or (x.shape[0] <= 1 and not launch.act_fp8), "a gemv launch: one row, no act_fp8"
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    assert out.shape == (M, N) and out.stride(1) == 1 and (out.dtype == x.dtype or x_scaled)
    if M == 0:
        return out
    block_m = tile_rows(M, launch)
    grid = (triton.cdiv(N, launch.block_n), triton.cdiv(M, block_m), launch.split_k)
    if launch.split_k > 1:
        assert workspace is not None, "split-K needs a workspace"
        partials, counters = workspace.get(*workspace_size(launch, M, N), x.device)
    else:
        partials = counters = out  # unused
    k_per_split = triton.cdiv(triton.cdiv(K, launch.block_k), launch.split_k) * launch.block_k
    w_desc = weight  # (unused without TMA)
    if launch.tma:
        assert launch.block_k <= 256 and weight.stride(0) * weight.element_size() % 16 == 0, "a TMA box and its strides"
        w_desc = TensorDescriptor.from_tensor(weight, [launch.block_n, launch.block_k])
    _linear_kernel[grid](
        x, weight, w_desc, weight_scale if scaled else out, x_scale if x_scaled else out, bias if bias is not None else out,
        out, partials, counters, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
        W_SCALED=scaled, X_SCALED=x_scaled, HAS_BIAS=bias is not None, GELU=gelu, ACT_FP8=launch.act_fp8,
        WIDEN_ASM=scaled and x.is_cuda and (x.dtype in (torch.bfloat16, torch.float16) or launch.gemv), W_TMA=launch.tma,
        DOT_FP32=(x.dtype == torch.bfloat16 or launch.act_fp8 or x_scaled) and os.environ.get("TRITON_INTERPRET") == "1",
        IEEE=x.dtype == torch.float32,
        PREFETCH_LINES=triton.next_power_of_2(triton.cdiv(k_per_split * weight.element_size(), 128)),
        LINE_ELEMS=128 // weight.element_size(),
        BLOCK_M=block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, SPLIT_K=launch.split_k, GEMV=launch.gemv,
        num_warps=launch.num_warps, num_stages=launch.num_stages, **pdl_launch(launch.pdl, x),
    )
    return out
