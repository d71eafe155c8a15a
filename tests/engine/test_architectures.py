"""Architectures by name (dummy weights), the stand-in tokenizer, the meta-device loader and its
streaming of safetensors shards, the HF export the benchmark compares against, and warm-up."""

import dataclasses
import logging

import pytest
import torch

from engine import LLM, SamplingParams
from engine.architectures import ARCHITECTURES, decode_bytes_per_step, decode_projection_shapes, named_architecture
from engine.errors import UnknownModel


def test_names_and_hub_ids_resolve_to_the_public_shapes():
    name, c = named_architecture("meta-llama/Llama-3.1-8B-Instruct")
    assert name == "llama-3.1-8b"
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) == \
        (32, 4096, 32, 8, 128, 14336)
    assert c.vocab_size == 128256 and not c.tie_word_embeddings and c.rope_theta == 500000.0
    assert dict(c.rope_scaling) == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert named_architecture("llama-3.2-1b")[1].tie_word_embeddings
    assert named_architecture("Qwen/Qwen2.5-7B-Instruct")[1].attention_bias
    assert named_architecture("llama-3.1-70b")[1].num_layers == 80
    assert named_architecture("mistral-7b")[1].vocab_size == 32768
    assert named_architecture("llama-9z") is None


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_bytes_per_step_are_the_weights_a_step_reads(name):
    """The floor's numerator: every parameter of the built model except an untied embedding table
    (a decode step reads one row of it per sequence), plus K/V."""
    from engine.attention import TorchAttention
    from engine.models import build_model
    from engine.models.layers import padded_vocab_size

    config = ARCHITECTURES[name]
    with torch.device("meta"):
        model = build_model(config, TorchAttention())
    skip_rows = padded_vocab_size(config.vocab_size) - config.vocab_size  # padding rows are never read
    params = sum(p.numel() for n, p in model.named_parameters() if not (n.endswith("embed_tokens.weight")
                                                                        and not config.tie_word_embeddings))
    params -= skip_rows * config.hidden_size
    assert decode_bytes_per_step(config, 2) == 2 * params
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    assert decode_bytes_per_step(config, 2, batch=4, context=100) - decode_bytes_per_step(config, 2) == 400 * kv_per_token
    shapes = decode_projection_shapes(config)
    assert len(shapes) == 5 and shapes[-1] == (padded_vocab_size(config.vocab_size), config.hidden_size, False)
    # fp8 projections (a byte a weight; the LM head stays) and an fp8 cache (a byte an element)
    projections = config.num_layers * sum(n * k for n, k, _ in shapes[:-1])
    assert decode_bytes_per_step(config, 2, projection_bytes=1) == 2 * params - projections
    assert decode_bytes_per_step(config, 2, 4, 100, kv_bytes=1) - decode_bytes_per_step(config, 2) == 200 * kv_per_token


def small(config, **kw):
    """The same architecture (RoPE scaling, biases, tying, GQA) at test size."""
    return dataclasses.replace(config, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                               intermediate_size=96, vocab_size=1000, max_position_embeddings=2048, **kw)


@pytest.fixture
def small_architectures(monkeypatch):
    for name, config in list(ARCHITECTURES.items()):
        monkeypatch.setitem(ARCHITECTURES, name, small(config))


def test_named_dummy_model_serves_token_ids_and_standin_text(small_architectures, caplog):
    with caplog.at_level(logging.WARNING):
        llm = LLM("llama-3.1-8b", load_format="dummy", num_kv_blocks=32)
    assert "STAND-IN" in caplog.text and "RANDOM weights" in caplog.text
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    by_ids, by_text = llm.generate([[5, 300, 999], "héllo"], params)
    assert len(by_ids.token_ids) == 6 and by_text.prompt_token_ids == list("héllo".encode())
    # Text is the stand-in's: one byte per id below 256, " t<id>" above.
    assert by_ids.text == llm.tokenizer.decode(by_ids.token_ids)
    assert all(f" t{t}" in by_ids.text for t in by_ids.token_ids if t >= 256)
    with pytest.raises(UnknownModel, match="--load-format dummy"):
        LLM("llama-3.1-8b")


def test_standin_tokenizer_round_trip_and_specials():
    from engine.tokenizer import standin_tokenizer

    tok = standin_tokenizer(128256, (128001, 128009), 128000)
    text = "Grüße, 世界!"
    ids = tok.encode(text)
    assert ids == list(text.encode()) and tok.decode(ids) == text
    assert tok.decode([300, 128255]) == " t300 t128255"
    assert tok.decode([128009, 65]) == "A" and tok.decode([128009], skip_special_tokens=False) == "<|special_128009|>"
    assert tok.vocab_size == 128256


def test_llama3_rope_tables_match_hf():
    """Scaled RoPE at long positions, where Llama 3.1's low-frequency stretch matters."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from engine.bench import hf_config_of
    from engine.models.llama import RotaryEmbedding

    config = dataclasses.replace(ARCHITECTURES["llama-3.1-8b"], max_position_embeddings=131072)
    ours = RotaryEmbedding(config)
    hf_cfg, _ = hf_config_of(config)
    assert isinstance(hf_cfg, LlamaConfig)
    hf = LlamaRotaryEmbedding(hf_cfg)
    positions = torch.tensor([[0, 7, 1000, 9000, 100000, 131071]])
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    half = config.head_dim // 2
    torch.testing.assert_close(ours.cos_half[positions[0]], cos[0, :, :half], atol=2e-5, rtol=0)
    torch.testing.assert_close(ours.sin_half[positions[0]], sin[0, :, :half], atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.2-1b", "qwen2.5-7b", "mistral-7b"])
def test_named_architectures_match_hf_on_the_same_weights(small_architectures, name):
    """Our model against HF's class for the architecture (Qwen2 for biased q/k/v), on our dummy
    weights shared as views: greedy tokens and the prompt's logits."""
    from engine.bench import hf_model_from_ours

    llm = LLM(name, load_format="dummy", dtype="float32", num_kv_blocks=64)
    runner = llm.engine.runner
    hf = hf_model_from_ours(runner.model, runner.model_config, runner.dtype, runner.device)
    prompt = [17, 256, 3, 999, 42, 500, 7, 8, 300, 301, 12]
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0].float()
    assert out.token_ids == expected[0, len(prompt):].tolist()
    hf_logprobs = torch.log_softmax(logits, -1)
    for i, lp in enumerate(out.logprobs):
        for token, value in lp.top:
            assert abs(value - hf_logprobs[len(prompt) - 1 + i, token].item()) < 1e-4


def test_loader_builds_in_the_final_dtype_and_seeds_dummy_weights(small_architectures):
    a = LLM("llama-3.2-1b", load_format="dummy", dtype="bfloat16", num_kv_blocks=8, seed=3).engine.runner.model
    b = LLM("llama-3.2-1b", load_format="dummy", dtype="bfloat16", num_kv_blocks=8, seed=3).engine.runner.model
    c = LLM("llama-3.2-1b", load_format="dummy", dtype="bfloat16", num_kv_blocks=8, seed=4).engine.runner.model
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    assert a.model.rotary.cos_half.dtype == torch.bfloat16 and a.model.rotary.cos_half[5, 0] == torch.cos(torch.tensor(5.0)).bfloat16()
    wa, wb, wc = (m.model.layers[0].mlp.down_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert 0.015 < wa.float().std().item() < 0.025
    assert torch.equal(a.model.layers[1].input_layernorm.weight, torch.ones(64, dtype=torch.bfloat16))


def test_sharded_safetensors_stream_in_with_the_same_result(tmp_path, tiny_llama_dir):
    """A checkpoint split into many shards loads tensor by tensor to the same model."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((__import__("pathlib").Path(tiny_llama_dir) / name).read_bytes())
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    one = LLM(tiny_llama_dir, num_kv_blocks=16).generate(["Hello there"], params)[0].token_ids
    many = LLM(str(tmp_path), num_kv_blocks=16).generate(["Hello there"], params)[0].token_ids
    assert one == many


def test_warm_up_leaves_no_trace(tiny_llm):
    """Warm-up (run on CUDA at start-up) frees every block and zeroes what it counted."""
    engine = tiny_llm.engine
    engine.warm_up()
    bm = engine.block_manager
    assert not engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    assert bm.prefix_cache_queries == bm.prefix_cache_hits == 0 and engine.scheduler.num_preemptions == 0
    stats = engine.live_stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.kv_cache_usage == 0.0



@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-7b"])
def test_materialize_allocates_what_to_empty_would_without_importing_sympy(name):
    """engine.loader.materialize allocates the meta-built model's tensors itself: the same names,
    shapes, dtypes and kinds as `model.to(dtype).to_empty(device)`, one tensor each, zeroed, the
    RoPE tables computed; and, in a fresh process, without the sympy import that `to_empty`
    (`empty_like` on meta tensors) costs a cold start."""
    import pathlib
    import subprocess
    import sys

    from engine.attention import TorchAttention
    from engine.loader import materialize
    from engine.models import build_model

    config = small(ARCHITECTURES[name])
    model = materialize(config, TorchAttention(), torch.device("cpu"), torch.bfloat16)
    with torch.device("meta"):
        reference = build_model(config, TorchAttention())
    reference = reference.to(dtype=torch.bfloat16).to_empty(device="cpu")
    ours, theirs = model.state_dict(keep_vars=True), reference.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    for key, tensor in ours.items():
        other = theirs[key]
        assert (tensor.shape, tensor.dtype, tensor.device, type(tensor)) == \
            (other.shape, other.dtype, other.device, type(other)), key
    params = list(model.parameters())
    assert len({p.data_ptr() for p in params}) == len(params) and not any(p.any() for p in params)
    tables = [b for b in model.buffers() if b.is_floating_point()]
    assert tables and all(b.abs().sum() > 0 for b in tables)  # RoPE's cos/sin
    probe = ("import dataclasses, sys, torch\n"
             "from engine.attention import TorchAttention\nfrom engine.architectures import ARCHITECTURES\n"
             "from engine.loader import materialize\n"
             f"config = dataclasses.replace(ARCHITECTURES[{name!r}], num_layers=1, vocab_size=1000)\n"
             "materialize(config, TorchAttention(), torch.device('cpu'), torch.bfloat16)\n"
             "assert 'sympy' not in sys.modules, 'sympy was imported'\n")
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=pathlib.Path(__file__).parents[2])
