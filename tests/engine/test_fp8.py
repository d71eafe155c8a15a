"""--quantization fp8: float8 e4m3 weights with a scale per output channel, activations scaled per
token, multiplied by torch._scaled_mm (torch's reference kernel here, cuBLASLt on Hopper)."""

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.models.layers import FP8, FP8_MAX, Fp8Linear, quantize_rows_fp8, quantize_tokens_fp8


def test_quantize_rows_round_trip():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different scales
    q, scale = quantize_rows_fp8(w)
    assert q.dtype == FP8 and scale.shape == (64,)
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((64,), FP8_MAX))  # each row's max hits e4m3's
    back = q.float() * scale[:, None]
    rel = ((back - w).norm(dim=1) / w.norm(dim=1))
    assert rel.max() < 0.04  # 3 mantissa bits: about 2% rms per row, whatever the row's scale
    exact = torch.tensor([[448.0, -224.0, 1.0, 0.5]])  # values e4m3 holds exactly come back exactly
    q, scale = quantize_rows_fp8(exact)
    assert torch.equal(q.float() * scale[:, None], exact)


def test_fp8_linear_is_the_scaled_product():
    torch.manual_seed(1)
    dense = torch.nn.Linear(128, 96).to(torch.bfloat16)
    layer = Fp8Linear.from_dense(dense, gelu=True)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    xq, x_scale = quantize_tokens_fp8(x)
    ref = (xq.float() * x_scale) @ (layer.weight.float() * layer.weight_scale.reshape(-1, 1)).t()
    ref = F.gelu(ref.to(torch.bfloat16) + dense.bias.detach(), approximate="tanh")
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 96)
    assert (out.float() - ref.float()).abs().max() < 0.02
    close = F.gelu(dense.float()(x.float()), approximate="tanh")
    assert F.cosine_similarity(out.float().flatten(), close.flatten(), dim=0) > 0.998


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_fp8_engine_close_to_full_precision(request, fixture):
    path = request.getfixturevalue(fixture)
    full = LLM(path, dtype="float32", num_kv_blocks=32)
    fp8 = LLM(path, dtype="float32", num_kv_blocks=32, quantization="fp8")
    layers = [m for m in fp8.engine.runner.model.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.weight.dtype == FP8 for m in layers)
    assert fp8.engine.runner.model_config.linear_schemes == ()
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, ignore_eos=True)
    prompts = ["Hello world, my name is", "The capital of France is", "def fibonacci(n):"]
    for a, b in zip(full.generate(prompts, params), fp8.generate(prompts, params)):
        assert a.token_ids == b.token_ids  # the same next token, nearly the same probability
        assert abs(a.logprobs[0].logprob - b.logprobs[0].logprob) < 0.15
        top_b = dict(b.logprobs[0].top)
        for token, logprob in a.logprobs[0].top:  # random tiny models' top 5 are close calls: compare shared ones
            if token in top_b:
                assert abs(logprob - top_b[token]) < 0.15
    out = fp8.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_on_cuda_with_graphs(tiny_llama_dir):
    """cuBLASLt's row-wise scaled FP8 GEMM inside the decode graphs and multi-step runs: the first
    tokens agree with bf16's."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = ["Hello world, my name is", "The capital of France is"]
    bf16 = LLM(tiny_llama_dir, device="cuda", dtype="bfloat16", kv_cache_memory_bytes=64 * 2**20)
    fp8 = LLM(tiny_llama_dir, device="cuda", dtype="bfloat16", quantization="fp8", kv_cache_memory_bytes=64 * 2**20)
    assert fp8.engine.runner.cuda_graphs_enabled
    for a, b in zip(bf16.generate(prompts, params), fp8.generate(prompts, params)):
        assert a.token_ids[:2] == b.token_ids[:2] and len(b.token_ids) == 16
