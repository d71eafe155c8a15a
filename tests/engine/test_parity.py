"""Greedy decoding must match HF transformers token for token (fp32, CPU)."""

import os

import pytest
import torch

from engine import LLM, SamplingParams

PROMPTS = [
    "Hello world, my name is",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far, far away, there lived a young girl who loved to read books about",
    "Q: What is 12 times 7?\nA:",
]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF generate on one prompt alone (no padding), with no EOS: it stops only at max_new_tokens."""
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(prompt_ids) + max_new_tokens
    return out[0, len(prompt_ids):].tolist()


def assert_batch_parity(llm: LLM, hf_model, prompts: list[str], max_new_tokens: int = 32) -> None:
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)  # one concurrent batch
    assert len({len(o.prompt_token_ids) for o in outs}) > 1, "prompts should differ in length"
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(hf_model, out.prompt_token_ids, max_new_tokens)
        assert out.token_ids == expected, f"mismatch for {prompt!r}"
        assert out.finish_reason == "length"


def test_smollm2_real_weights_match_hf(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    ).eval()
    llm = LLM("smollm2-135m-instruct", dtype="float32")
    assert llm.engine.model_config.num_kv_heads == 3 and llm.engine.model_config.num_layers == 30
    assert_batch_parity(llm, hf, PROMPTS, 32)


def test_smollm2_tokenizer_matches_hf(smollm2_gguf):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf))
    llm_tok = LLM("smollm2-135m-instruct", num_kv_blocks=4).tokenizer
    texts = PROMPTS + ["  leading spaces", "naïve café — 東京 🚀", "<|im_start|>user\nhi<|im_end|>", "12345 67.89"]
    for text in texts:
        assert llm_tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text
    messages = [{"role": "user", "content": "Hi there"}]
    assert llm_tok.apply_chat_template(messages) == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_random_gpt2_matches_hf(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # the real 124M architecture, random weights
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=64)
    assert_batch_parity(llm, hf, PROMPTS[:4], 32)


def test_tiny_llama_gqa_matches_hf(tiny_llama_dir, tiny_llm):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert_batch_parity(tiny_llm, hf, PROMPTS, 40)


def test_tiny_gpt2_checkpoint_uses_builtin_tokenizer(tiny_gpt2_dir):
    llm = LLM(tiny_gpt2_dir, num_kv_blocks=16)
    assert llm.tokenizer.encode("Hello world") == [15496, 995]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton path runs on the CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_triton_kernel_path_matches_hf_under_interpreter(arch, tiny_llama_dir, tiny_gpt2_dir):
    """The CUDA path's model code (Triton attention, fused add+norm, RoPE, SiLU*mul) run through the
    engine on the CPU by Triton's interpreter, fp32: greedy tokens equal HF's."""
    from transformers import AutoModelForCausalLM

    path = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    llm = LLM(path, dtype="float32", attention_backend="triton", num_kv_blocks=32, max_num_batched_tokens=24)
    assert llm.engine.runner.attention.name == "triton"
    for kv in llm.engine.runner.kv_caches:
        kv.fill_(float("nan"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = PROMPTS[:2] + [PROMPTS[3]]  # the long one is prefilled in chunks of 24 tokens
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for out in outs:
        assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, 10)


def test_smollm2_gguf_blocks_give_the_dequantised_models_tokens(smollm2_gguf):
    """The default CPU path (Q4_1/Q8_0 blocks through the C++ kernels, C++ decode attention) and
    the dequantised fp32 weights through plain torch: the same greedy tokens."""
    blocks = LLM("smollm2-135m-instruct", quantization="gguf", num_kv_blocks=64)
    dense = LLM("smollm2-135m-instruct", quantization="none", attention_backend="torch", num_kv_blocks=64)
    assert dict(blocks.engine.model_config.linear_schemes) == {
        "qkv_proj": "q4_1", "o_proj": "q4_1", "gate_up_proj": "q4_1", "down_proj": "q4_1", "lm_head": "q8_0"}
    assert not dense.engine.model_config.linear_schemes and blocks.engine.runner.attention.name == "cpu"
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in blocks.generate(PROMPTS, params)] == [o.token_ids for o in dense.generate(PROMPTS, params)]


def test_smollm2_decode_layers_in_one_call_match_the_layer_loop(smollm2_gguf):
    """The CPU default's decode steps run every layer in one C++ call (roseinfer_kernels/cpu_layers.py);
    the Python loop over the same kernels gives the same tokens and the same log-probabilities.
    The blocks are forced: `auto` keeps them only where they measure faster than dense float32,
    which an AVX2-only machine's did not (0.3x)."""
    llm = LLM("smollm2-135m-instruct", num_kv_blocks=64, quantization="gguf")
    model = llm.engine.runner.model
    params = SamplingParams(max_tokens=24, temperature=0.0, logprobs=0, ignore_eos=True)
    fused = llm.generate(PROMPTS, params)
    assert model.__dict__["_decode_layers_call"][1] is not None  # the one-call path ran
    model.__dict__["_decode_layers_call"] = (llm.engine.runner.kv_caches, None)  # the layer loop from here on
    looped = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in fused] == [o.token_ids for o in looped]
    for a, b in zip(fused, looped):
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_cpu_attention_backend_matches_torch(tiny_llama_dir):
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    cpu = LLM(tiny_llama_dir, attention_backend="cpu", num_kv_blocks=64)
    torch_backend = LLM(tiny_llama_dir, attention_backend="torch", num_kv_blocks=64)
    assert [o.token_ids for o in cpu.generate(PROMPTS, params)] == \
        [o.token_ids for o in torch_backend.generate(PROMPTS, params)]
