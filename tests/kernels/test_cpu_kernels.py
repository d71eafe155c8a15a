"""The C++ CPU kernels (roseinfer_kernels/cpu/*.cpp) against their torch references, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from engine.attention import paged_decode_torch
from roseinfer_kernels.cpu_attention import paged_decode, rotary_write_kv
from roseinfer_kernels.gguf_linear import BLOCK_BYTES, gguf_dequantize, gguf_linear, row_bytes
from roseinfer_kernels.reference import gguf_dequantize_ref, rotary_write_kv_ref


def random_blocks(n: int, k: int, scheme: str, gen: torch.Generator) -> torch.Tensor:
    """Random codes with finite fp16 scales (and minimums), as a GGUF file holds them."""
    blocks = torch.randint(0, 256, (n, k // 32, BLOCK_BYTES[scheme]), dtype=torch.uint8, generator=gen)
    blocks[..., :2] = (torch.rand(n, k // 32, 1, generator=gen) * 0.02 + 1e-4).half().view(torch.uint8)
    if scheme == "q4_1":
        blocks[..., 2:4] = (torch.randn(n, k // 32, 1, generator=gen) * 0.05).half().view(torch.uint8)
    return blocks.view(n, row_bytes(k, scheme))


@pytest.mark.parametrize("scheme", ["q4_1", "q8_0"])
def test_dequantize_gives_exactly_the_reference_weights(scheme):
    gen = torch.Generator().manual_seed(0)
    blocks = random_blocks(70, 96, scheme, gen)
    assert torch.equal(gguf_dequantize(blocks, 96, scheme), gguf_dequantize_ref(blocks, 96, scheme))


@pytest.mark.parametrize("scheme", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16, 40, 300])
def test_gguf_linear_matches_the_dense_product(scheme, rows):
    """Rows 8 at a time through the block kernel, and past MAX_KERNEL_ROWS through dequantise + sgemm."""
    gen = torch.Generator().manual_seed(rows)
    n, k = 150, 192
    blocks = random_blocks(n, k, scheme, gen)
    x = torch.randn(rows, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    ref = x.double() @ gguf_dequantize_ref(blocks, k, scheme).double().t() + bias.double()
    got = gguf_linear(x, blocks, n, k, scheme, bias)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-6


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_rotary_write_kv_rotates_q_and_k_and_fills_the_cache(heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(heads)
    tokens, max_pos, blocks, bs = 7, 200, 5, 16
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    slots = torch.randperm(blocks * bs, generator=gen)[:tokens]
    slots[2] = -1  # padding: not stored

    def views(t):
        q, k, v = t.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
        return q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)

    caches = [torch.full((blocks, kv_heads, bs, dim), float("nan")) for _ in range(4)]
    ref_q = rotary_write_kv_ref(*views(qkv.clone()), caches[2], caches[3], slots, positions, cos, sin)
    got = qkv.clone()
    q, k, v = views(got)
    rotary_write_kv(q, k, v, caches[0], caches[1], slots, positions, cos, sin)
    torch.testing.assert_close(q, ref_q, rtol=1e-6, atol=1e-6)
    # k is rotated in place too (the prefill path attends to it directly): the cache holds the same values.
    written = slots[slots >= 0]
    torch.testing.assert_close(k[slots >= 0], caches[0][written // bs, :, written % bs], rtol=0, atol=0)
    torch.testing.assert_close(caches[0].nan_to_num(7.0), caches[2].nan_to_num(7.0), rtol=1e-6, atol=1e-6)
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))
    assert torch.equal(v, views(qkv)[2])


# AVX-512 registers where they fit; the portable loops for a head_dim that is not a multiple of 16
# and for a group too large to hold in registers; contexts of 128+ tokens cut into parts (merged
# from their maxima and sums), beside a short one and a padding row in the same batch.
@pytest.mark.parametrize("heads,kv_heads,dim,lens", [(9, 3, 64, [1, 17, 40, 0]), (4, 4, 32, [5, 64]), (8, 2, 128, [33]),
                                                     (2, 1, 24, [7, 30]), (16, 1, 64, [50, 3]),
                                                     (9, 3, 64, [700]), (9, 3, 64, [300, 0, 129, 5]),
                                                     (2, 1, 24, [400]), (2, 1, 64, [700, 2, 0])])
def test_paged_decode_matches_the_gathering_reference(heads, kv_heads, dim, lens):
    gen = torch.Generator().manual_seed(dim + sum(lens))
    bs = 16
    max_blocks = max(-(-n // bs) for n in lens) or 1
    num_blocks = len(lens) * max_blocks + 3
    k_cache = torch.randn(num_blocks, kv_heads, bs, dim, generator=gen)
    v_cache = torch.randn(num_blocks, kv_heads, bs, dim, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen)[: len(lens) * max_blocks].view(len(lens), max_blocks).int()
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), heads, dim, generator=gen)
    got = paged_decode(q, k_cache, v_cache, tables, seq_lens, dim**-0.5)
    ref = paged_decode_torch(q, torch.stack([k_cache, v_cache]), tables, seq_lens, dim**-0.5)
    live = seq_lens > 0  # the reference has no answer for a padding row (its softmax is over nothing)
    torch.testing.assert_close(got[live], ref[live], rtol=1e-5, atol=1e-5)
    if 0 in lens:
        assert torch.equal(got[lens.index(0)], torch.zeros(heads, dim))


@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_reference(with_residual):
    from roseinfer_kernels.cpu_elementwise import add_rms_norm
    from roseinfer_kernels.reference import add_norm_ref

    gen = torch.Generator().manual_seed(int(with_residual))
    x = torch.randn(5, 576, generator=gen) * 3 + 1
    residual = torch.randn(5, 576, generator=gen) if with_residual else None
    weight = torch.rand(576, generator=gen) + 0.5
    got, got_sum = add_rms_norm(x, residual, weight, 1e-5)
    ref, ref_sum = add_norm_ref(x, residual, weight, None, 1e-5, True)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_sum, ref_sum) and (with_residual or got_sum is x)


def test_silu_mul_matches_reference():
    from roseinfer_kernels.cpu_elementwise import silu_mul
    from roseinfer_kernels.reference import silu_and_mul_ref

    x = torch.randn(3, 2 * 1536, generator=torch.Generator().manual_seed(0)) * 4
    torch.testing.assert_close(silu_mul(x), silu_and_mul_ref(x), rtol=1e-6, atol=1e-6)


def test_a_built_library_loads_past_a_dead_processs_lock_file():
    """torch's extension loader waits forever on a lock file a killed process left behind (a CI run
    once hung every server start that way); a finished build must load without looking at it."""
    import os
    import subprocess
    import sys

    from roseinfer_kernels.cpu_build import build_directory, extension

    extension()  # built by make install; builds here otherwise
    stale = os.path.join(build_directory(), "lock")
    open(stale, "w").close()
    try:
        code = "from roseinfer_kernels.cpu_build import extension; print(extension().__name__)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "roseinfer_cpu_kernels"
    finally:
        os.remove(stale)
