"""Linear layers over GGUF Q4_1 / Q8_0 blocks on the CPU (roseinfer_kernels/cpu/gguf_gemm.cpp, built by
roseinfer_kernels/cpu_build.py). Up to MAX_KERNEL_ROWS rows run the block kernel, 8 rows a pass; larger
batches (long prefills) dequantise the matrix and run one sgemm.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from roseinfer_kernels.cpu_build import extension

BLOCK = 32
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}
# Where dequantise + sgemm starts to win over the block kernel, a 3072x576 Q4_1 projection on two
# cores: with AVX-512, 7.1 against 7.7 ms at 256 rows and 14.0 against 11.9 ms at 512; with AVX2
# only (multiply-adds half as wide), 9.7 against 10.0 ms at 128 rows and 19.7 against 14.3 at 256.
MAX_KERNEL_ROWS = 256 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 128


def row_bytes(k: int, scheme: str) -> int:
    assert k % BLOCK == 0, "GGUF blocks need k to be a multiple of 32"
    return k // BLOCK * BLOCK_BYTES[scheme]


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, n: int, k: int, scheme: str,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, k] float32 @ W^T, W [n, k] given as GGUF blocks [n, row_bytes(k)] uint8."""
    assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == k and not x.is_cuda
    assert blocks.dtype == torch.uint8 and blocks.shape == (n, row_bytes(k, scheme))
    q4_1 = scheme == "q4_1"
    if x.shape[0] > MAX_KERNEL_ROWS:
        y = F.linear(x, extension().gguf_dequantize(blocks, k, q4_1))
    else:
        y = extension().gguf_linear(x, blocks, n, q4_1)
    return y if bias is None else y + bias


def gguf_dequantize(blocks: torch.Tensor, k: int, scheme: str) -> torch.Tensor:
    """The fp32 weights [n, k] the blocks hold."""
    return extension().gguf_dequantize(blocks, k, scheme == "q4_1")


def blocks_speedup(n: int, k: int, scheme: str, reps: int = 5) -> float:
    """How many times faster one row through [n, k] projections in blocks is than dense fp32 on
    this machine, over enough copies (256 MB of fp32) that neither fits in the caches, as a
    decode step sees them (median of `reps`, random weights): the loader's choice, made once."""
    copies = max(2, -(-2**28 // (n * k * 4)))
    blocks = [torch.randint(0, 256, (n, row_bytes(k, scheme)), dtype=torch.uint8) for _ in range(copies)]
    for b in blocks:  # finite scales
        scales = b.view(n, k // BLOCK, BLOCK_BYTES[scheme])[..., :2]
        scales.copy_(torch.full(scales.shape[:-1] + (1,), 0.01, dtype=torch.float16).view(torch.uint8))
    dense = [gguf_dequantize(b, k, scheme) for b in blocks]
    x = torch.randn(1, k)

    def median_s(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[reps // 2]

    dense_s = median_s(lambda: [F.linear(x, w) for w in dense])
    return dense_s / median_s(lambda: [gguf_linear(x, b, n, k, scheme) for b in blocks])
