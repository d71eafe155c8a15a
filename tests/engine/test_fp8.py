"""--quantization fp8: float8 e4m3 weights with a scale per output channel, activations scaled per
token, multiplied by torch._scaled_mm (torch's reference kernel here, cuBLASLt on Hopper)."""

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.models.layers import Fp8Linear
from roseinfer_kernels.fp8 import FP8, FP8_MAX, quantize_rows_fp8, quantize_tokens_fp8


def decode_steps_close(want, got, tolerance: float = 0.15) -> int:
    """Each pair of outputs (greedy, logprobs=0 or more): the same first token, and every step up
    to the first differing token within `tolerance` in log-probability. Where `want` carries top
    log-probabilities, the first differing token must be a near tie there: among `want`'s top
    tokens, within `tolerance` of its choice. Returns the decode steps (past the first token)
    compared."""
    compared = 0
    for a, b in zip(want, got):
        assert a.token_ids[0] == b.token_ids[0]
        for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                if a.logprobs[i].top:
                    top = dict(a.logprobs[i].top)
                    assert y in top and a.logprobs[i].logprob - top[y] < tolerance, (i, x, y, top)
                break
            assert abs(a.logprobs[i].logprob - b.logprobs[i].logprob) < tolerance
            compared += i > 0
    return compared


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


# What each Llama FP8 projection is handed: the norms' and SiLU's rows already in e4m3
# (quantized by the kernel that wrote them), attention's output as it is.
EXPECTED_INPUTS = {"qkv_proj": {"Fp8Rows"}, "o_proj": {"Tensor"}, "gate_up_proj": {"Fp8Rows"}, "down_proj": {"Fp8Rows"}}


@contextlib.contextmanager
def inputs_seen(llm: LLM):
    """Within: {projection name: the type names of its inputs} over every Fp8Linear of `llm`."""
    seen: dict[str, set[str]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name.rsplit(".", 1)[-1]:
                                         seen.setdefault(name, set()).add(type(args[0]).__name__))
             for name, m in llm.engine.runner.model.named_modules() if isinstance(m, Fp8Linear)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


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
    with inputs_seen(fp8) as seen:
        fp8_outputs = fp8.generate(prompts, params)
    if fixture == "tiny_llama_dir":
        assert seen == EXPECTED_INPUTS
    for a, b in zip(full.generate(prompts, params), fp8_outputs):
        assert a.token_ids == b.token_ids  # the same next token, nearly the same probability
        assert abs(a.logprobs[0].logprob - b.logprobs[0].logprob) < 0.15
        top_b = dict(b.logprobs[0].top)
        for token, logprob in a.logprobs[0].top:  # random tiny models' top 5 are close calls: compare shared ones
            if token in top_b:
                assert abs(logprob - top_b[token]) < 0.15
    out = fp8.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8


def test_fp8_kv_cache_holds_twice_the_tokens_and_decodes_close(tiny_llama_dir):
    """--kv-cache-dtype fp8 on the CPU (the torch attention backend): the same bytes hold twice a
    bf16 cache's blocks, and decode steps, which read K and V back from the e4m3 cache, give the
    bf16 cache's next tokens with nearly the same log-probabilities. Blocks all come back."""
    kw = dict(dtype="bfloat16", kv_cache_memory_bytes=2 * 2**20, attention_backend="torch")
    bf16 = LLM(tiny_llama_dir, **kw)
    fp8 = LLM(tiny_llama_dir, kv_cache_dtype="fp8", **kw)
    assert all(kv.dtype == FP8 for kv in fp8.engine.runner.kv_caches)
    assert fp8.engine.runner.num_blocks == 2 * bf16.engine.runner.num_blocks
    # calibrated at load: a (k_scale, v_scale) per layer, each layer's own
    scales = [m.kv_scales for m in fp8.engine.runner.model.modules() if hasattr(m, "kv_scales")]
    assert len(scales) == 2 and len(set(scales)) == 2 and all(0 < x < 1 for pair in scales for x in pair)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    prompts = ["Hello world, my name is", "The capital of France is", "def fibonacci(n):"]
    assert decode_steps_close(bf16.generate(prompts, params), fp8.generate(prompts, params)) >= 6
    bm = fp8.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    with pytest.raises(ValueError, match="fp8 KV cache"):
        LLM(tiny_llama_dir, kv_cache_dtype="fp8", attention_backend="cpu", num_kv_blocks=8)


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


def _write_fp8_checkpoint(src_dir: str, dst_dir: str, llm: LLM, per_tensor: bool = False) -> dict:
    """`llm`'s FP8 projections saved as an HF FP8 checkpoint: q/k/v and gate/up split back to HF
    names, float8 weights with `weight_scale` (per output row [N, 1], or one scalar), the rest as
    in `src_dir`. Returns the FP8 weights written, by our parameter name."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src_dir, dst_dir)
    dense = load_file(os.path.join(src_dir, "model.safetensors"))
    model = llm.engine.runner.model
    out = {k: v for k, v in dense.items() if not any(p in k for p in ("_proj.",))}
    written = {}
    for name, module in model.named_modules():
        if not isinstance(module, Fp8Linear):
            continue
        fused = name.rsplit(".", 1)[-1]
        parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}.get(fused, (fused,))
        sizes = model._shard_sizes(fused) if len(parts) > 1 else [module.out_features]
        q_all, s_all = module.weight.detach(), module.weight_scale.detach()
        offset = 0
        for part, size in zip(parts, sizes):
            q, s = q_all[offset:offset + size], s_all[offset:offset + size]
            if per_tensor:  # requantized to one scale for the whole tensor
                w = q.float() * s[:, None]
                scale = w.abs().max() / FP8_MAX
                q, s = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.reshape(())
            else:
                s = s[:, None]
            out[f"{name.replace(fused, part)}.weight"] = q.contiguous()
            out[f"{name.replace(fused, part)}.weight_scale"] = s.contiguous().float()
            out[f"{name.replace(fused, part)}.input_scale"] = torch.tensor(1.0)  # present in many: ignored
            offset += size
        written[name] = (q_all.clone(), s_all.clone())
    os.remove(os.path.join(dst_dir, "model.safetensors"))
    save_file(out, os.path.join(dst_dir, "model.safetensors"))
    with open(os.path.join(dst_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    with open(os.path.join(dst_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    return written


def test_an_fp8_checkpoint_loads_as_it_is(tiny_llama_dir, tmp_path):
    quantized = LLM(tiny_llama_dir, num_kv_blocks=32, quantization="fp8")
    written = _write_fp8_checkpoint(tiny_llama_dir, str(tmp_path / "fp8"), quantized)
    loaded = LLM(str(tmp_path / "fp8"), num_kv_blocks=32)  # --quantization auto: the checkpoint says fp8
    modules = dict(loaded.engine.runner.model.named_modules())
    for name, (q, scale) in written.items():
        assert isinstance(modules[name], Fp8Linear)
        assert torch.equal(modules[name].weight.view(torch.uint8), q.view(torch.uint8)), name  # bit for bit
        assert torch.equal(modules[name].weight_scale, scale), name
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = ["Hello world, my name is", "def fibonacci(n):"]
    assert [o.token_ids for o in loaded.generate(prompts, params)] == [o.token_ids for o in quantized.generate(prompts, params)]
    with pytest.raises(Exception, match="FP8 checkpoint"):
        LLM(str(tmp_path / "fp8"), num_kv_blocks=32, quantization="none")


def test_an_fp8_checkpoint_with_one_scale_per_tensor(tiny_llama_dir, tmp_path):
    quantized = LLM(tiny_llama_dir, num_kv_blocks=32, quantization="fp8")
    _write_fp8_checkpoint(tiny_llama_dir, str(tmp_path / "fp8t"), quantized, per_tensor=True)
    loaded = LLM(str(tmp_path / "fp8t"), num_kv_blocks=32)
    attn = loaded.engine.runner.model.model.layers[0].self_attn
    q_rows = attn.num_heads * attn.head_dim
    scales = attn.qkv_proj.weight_scale
    assert torch.all(scales[:q_rows] == scales[0]) and scales[q_rows] != scales[0]  # q's one scale, then k's
    out = loaded.generate(["Hello world, my name is"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_kv_cache_on_cuda_with_graphs(tiny_llama_dir):
    """The Triton kernels write and read the e4m3 cache inside the decode graphs, the multi-step
    runs and the mixed-step graphs (a long prompt's chunks): the tokens agree with bf16's up to a near tie."""
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=5, ignore_eos=True)
    prompts = ["Hello world, my name is", "The capital of France is " * 20]
    kw = dict(device="cuda", dtype="bfloat16", kv_cache_memory_bytes=64 * 2**20, max_num_batched_tokens=64)
    bf16 = LLM(tiny_llama_dir, **kw)
    fp8 = LLM(tiny_llama_dir, kv_cache_dtype="fp8", **kw)
    assert fp8.engine.runner.cuda_graphs_enabled and fp8.engine.runner.num_blocks == 2 * bf16.engine.runner.num_blocks
    want, got = bf16.generate(prompts, params), fp8.generate(prompts, params)
    assert all(len(b.token_ids) == 24 for b in got)
    # random weights leave near ties that e4m3's rounding may flip: a flip must be one
    assert decode_steps_close(want, got) >= 1


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton path runs on the CPU only under TRITON_INTERPRET=1")
def test_fp8_kv_cache_through_the_triton_kernels_under_interpreter(tiny_llama_dir):
    """The CUDA path's kernels with an e4m3 cache, run by Triton's interpreter through the engine:
    the calibration prefill (its tile list), RoPE + the scaled cache write, prefill chunks that read
    earlier chunks back from the cache, and decode. The first tokens match the same path with an
    fp32 cache, and agreeing steps' log-probabilities stay close."""
    kw = dict(dtype="float32", attention_backend="triton", num_kv_blocks=32, max_num_batched_tokens=24)
    full = LLM(tiny_llama_dir, **kw)
    fp8 = LLM(tiny_llama_dir, kv_cache_dtype="fp8", **kw)
    assert fp8.engine.runner.kv_caches[0].dtype == FP8
    scales = [m.kv_scales for m in fp8.engine.runner.model.modules() if hasattr(m, "kv_scales")]
    assert all(0 < x < 1 for pair in scales for x in pair)
    prompts = ["Hello world, my name is",
               "Once upon a time, in a land far, far away, there lived a young girl who"]  # prefilled in chunks
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    decode_steps_close(full.generate(prompts, params), fp8.generate(prompts, params))


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton path runs on the CPU only under TRITON_INTERPRET=1")
def test_fp8_weights_through_the_skinny_kernel_under_interpreter(tiny_llama_dir):
    """The CUDA path's decode projections with fp8 weights: the skinny kernel reads them and widens
    them in registers (its launches configured as on a GPU), prefill chunks go through
    torch._scaled_mm. Next tokens and their log-probabilities stay close to full precision."""
    kw = dict(dtype="float32", attention_backend="triton", num_kv_blocks=32, max_num_batched_tokens=24)
    full = LLM(tiny_llama_dir, **kw)
    fp8 = LLM(tiny_llama_dir, quantization="fp8", **kw)
    layers = [m for m in fp8.engine.runner.model.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.projection.launch_for(1) is not None for m in layers)  # decode: the skinny kernel
    assert all(m.prequantized.launch_for(1) is not None for m in layers)  # and on e4m3 rows
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    prompts = ["Hello world, my name is", "The capital of France is"]
    with inputs_seen(fp8) as seen:
        assert decode_steps_close(full.generate(prompts, params), fp8.generate(prompts, params)) >= 2
    assert seen == EXPECTED_INPUTS


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton path runs on the CPU only under TRITON_INTERPRET=1")
def test_unquantized_inputs_are_quantized_first_where_the_table_measured_it_faster(tiny_llama_dir, monkeypatch):
    """An FP8 projection fed the model dtype (o_proj, after attention) quantizes its input with
    roseinfer_kernels.fp8_rows.quantize_rows and multiplies e4m3 by e4m3, at the batch buckets where
    the launch table measured that faster than its own launch; elsewhere (and without measurements:
    the real table has none yet) it runs as before. Tokens stay close to full precision."""
    from roseinfer_kernels import launch_table
    from roseinfer_kernels.launch_table import QUANTIZE_FIRST_KEY

    real = launch_table.load_table
    launch = {"block_n": 32, "block_k": 32, "split_k": 1, "num_warps": 4, "num_stages": 2}

    def table(path=launch_table.TABLE_PATH, section="entries"):  # quantizing first measured faster at b1, b2
        got = dict(real(path, section))
        for (n, k), bucket in itertools.product(shapes, (1, 2)):
            first, own = (f"linear/{dtype}/n{n}/k{k}/b{bucket}" for dtype in (QUANTIZE_FIRST_KEY, "float8_e4m3fn"))
            got.update({first: {"us": 1.0}, own: {"us": 2.0}} if section == "measured" else {first: launch})
        return got

    kw = dict(dtype="float32", attention_backend="triton", num_kv_blocks=32, max_num_batched_tokens=24)
    full = LLM(tiny_llama_dir, **kw)
    shapes = [(m.out_features, m.in_features) for m in full.engine.runner.model.modules()
              if type(m).__name__ == "DecodeLinear"]
    monkeypatch.setattr(launch_table, "load_table", table)
    fp8 = LLM(tiny_llama_dir, quantization="fp8", **kw)
    layers = [m for m in fp8.engine.runner.model.modules() if isinstance(m, Fp8Linear)]
    assert all([(b, f) for b, f, _ in m.quantize_first[:3]] == [(1, True), (2, True), (4, False)]
               and not any(f for _, f, _ in m.quantize_first[2:]) for m in layers)
    calls = []
    for m in layers:
        quantize = m.quantize_rows
        m.quantize_rows = lambda x, quantize=quantize: calls.append(x.shape[0]) or quantize(x)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    prompts = ["Hello world, my name is", "The capital of France is"]  # decode batches of 1-2: quantized first
    with inputs_seen(fp8) as seen:
        assert decode_steps_close(full.generate(prompts, params), fp8.generate(prompts, params)) >= 2
    assert seen == EXPECTED_INPUTS  # o_proj is still handed attention's output as it is
    assert calls and set(calls) <= {1, 2}  # decode steps only (the prompts' rows take the other path)


def test_an_fp8_cache_takes_its_own_decode_launch_where_the_table_has_one(tmp_path):
    """The table's e4m3-cache entry at its bucket; the model dtype's entry at the others (not the
    nearest e4m3 entry: a launch measured at batch 64 is no guide at batch 1)."""
    import json

    from roseinfer_kernels.launch_table import FP8_CACHE_KEY, decode_key, decode_launch
    from roseinfer_kernels.paged_attention import DecodeLaunch

    bf16_b1, bf16_b64, fp8_b64 = (DecodeLaunch(tokens=32, num_splits=8), DecodeLaunch(num_warps=8),
                                  DecodeLaunch(num_warps=4, num_stages=3))
    entries = {decode_key("bfloat16", 128, 4, 16, 1): vars(bf16_b1), decode_key("bfloat16", 128, 4, 16, 64): vars(bf16_b64),
               decode_key(FP8_CACHE_KEY, 128, 4, 16, 64): vars(fp8_b64)}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": entries}))

    def launch(num_seqs, fp8_cache):
        return decode_launch("bfloat16", 128, 4, 16, num_seqs, 8, 132, table_path=str(path), fp8_cache=fp8_cache)
    assert launch(64, True) == fp8_b64 and launch(48, True) == fp8_b64
    assert launch(64, False) == bf16_b64
    assert launch(1, True) == bf16_b1 == launch(1, False)


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton path runs on the CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_gemv_launches_at_batch_one_decode_as_the_tiled_ones_do(tiny_llama_dir, monkeypatch, quantization):
    """A launch table whose batch-1 entries are gemv launches (dense, W8A16 and e4m3-row ones):
    one request at a time decodes through them, the same greedy tokens as the table's own launches
    and log-probabilities within float32 rounding."""
    from roseinfer_kernels import launch_table
    from roseinfer_kernels.launch_table import PREQUANTIZED_KEY

    real = launch_table.load_table
    gemv = {"block_n": 16, "block_k": 32, "split_k": 2, "num_warps": 4, "num_stages": 1, "gemv": True}

    def table(path=launch_table.TABLE_PATH, section="entries"):
        got = dict(real(path, section))
        if section == "entries":
            for (n, k), dtype in itertools.product(shapes, ("float32", "float8_e4m3fn", PREQUANTIZED_KEY)):
                got[f"linear/{dtype}/n{n}/k{k}/b1"] = gemv
        return got

    kw = dict(dtype="float32", attention_backend="triton", num_kv_blocks=32, max_num_batched_tokens=24,
              quantization=quantization)
    tiled = LLM(tiny_llama_dir, **kw)
    shapes = [(m.out_features, m.in_features) for m in tiled.engine.runner.model.modules()
              if type(m).__name__ in ("DecodeLinear", "Fp8Linear")]
    monkeypatch.setattr(launch_table, "load_table", table)
    with_gemv = LLM(tiny_llama_dir, **kw)
    projections = [m.projection for m in with_gemv.engine.runner.model.modules()
                   if type(m).__name__ in ("DecodeLinear", "Fp8Linear")]
    assert projections and all(p.launch_for(1).gemv and not p.launch_for(2).gemv for p in projections)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)
    for prompt in ["Hello world, my name is", "The capital of France is"]:  # one at a time: batch-1 decode steps
        (want,), (got,) = tiled.generate([prompt], params), with_gemv.generate([prompt], params)
        assert got.token_ids == want.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(want.logprobs, got.logprobs)) < 1e-3
