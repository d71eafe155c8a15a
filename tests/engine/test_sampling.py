"""Sampling parameters, stop handling and request validation through the real engine."""

import os

import pytest
import torch

from engine import ContextLengthExceeded, InvalidRequest, SamplingParams
from engine.sampler import SamplingBatch, sample

PROMPT = "The weather today is"


def gen(llm, params, prompt=PROMPT):
    return llm.generate([prompt], params)[0]


def test_seed_reproduces_and_differs_across_seeds(tiny_llm):
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=42, ignore_eos=True)
    a = gen(tiny_llm, p).token_ids
    # Same seed, different batch company: same tokens.
    others = [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)] * 3
    batch = tiny_llm.generate(["x y z", PROMPT, "hello", "more words here"], [others[0], p, others[1], others[2]])
    assert batch[1].token_ids == a
    b = gen(tiny_llm, SamplingParams(max_tokens=20, temperature=1.0, seed=43, ignore_eos=True)).token_ids
    assert a != b


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny_llm):
    greedy = gen(tiny_llm, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)).token_ids
    assert gen(tiny_llm, SamplingParams(max_tokens=16, temperature=1.5, top_k=1, ignore_eos=True)).token_ids == greedy
    assert gen(tiny_llm, SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, ignore_eos=True)).token_ids == greedy
    assert gen(tiny_llm, SamplingParams(max_tokens=16, temperature=1.5, min_p=1.0, ignore_eos=True)).token_ids == greedy


def test_max_tokens_gives_length_finish(tiny_llm):
    out = gen(tiny_llm, SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_stop_token_ids_and_eos(tiny_llm):
    ref = gen(tiny_llm, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)).token_ids
    out = gen(tiny_llm, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(ref[4],), ignore_eos=True))
    first = ref.index(ref[4])
    assert out.token_ids == ref[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == ref[4]
    # min_tokens suppresses the stop token until enough tokens exist.
    out = gen(tiny_llm, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(ref[0],), min_tokens=3, ignore_eos=True))
    assert len(out.token_ids) >= 3 and ref[0] not in out.token_ids[:3]


def test_stop_string_truncates_text(tiny_llm):
    full = gen(tiny_llm, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    text = full.text
    stop = text[10:14]
    assert stop.strip(), "need a visible stop string"
    out = gen(tiny_llm, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,)))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = gen(tiny_llm, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,), include_stop_str_in_output=True))
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_streamed_text_equals_full_decode(tiny_llm):
    out = gen(tiny_llm, SamplingParams(max_tokens=40, temperature=1.0, seed=7, ignore_eos=True))
    assert out.text == tiny_llm.tokenizer.decode(out.token_ids)


def test_logprobs_shapes(tiny_llm):
    out = gen(tiny_llm, SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True))
    assert len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token
        assert lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-5)


def test_sampler_penalties_and_bias_move_logits():
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    base = SamplingParams(temperature=0.0)

    def pick(params, out_ids=(), prompt_ids=()):
        batch = SamplingBatch([params], [None], [list(prompt_ids)], [list(out_ids)], eos_token_ids=(3,))
        return sample(logits.clone(), batch).token_ids.item()

    assert pick(base) == 0
    assert pick(SamplingParams(temperature=0.0, frequency_penalty=0.5), out_ids=[0]) == 1
    assert pick(SamplingParams(temperature=0.0, presence_penalty=0.2), out_ids=[0, 0]) == 1
    assert pick(SamplingParams(temperature=0.0, repetition_penalty=1.2), prompt_ids=[0]) == 1
    assert pick(SamplingParams(temperature=0.0, logit_bias={3: 10.0})) == 3
    # min_tokens bans EOS (id 3) while too few tokens exist.
    assert pick(SamplingParams(temperature=0.0, logit_bias={3: 10.0}, min_tokens=2), out_ids=[1]) == 0


def test_seeded_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().repeat(4000, 1)
    params = [SamplingParams(temperature=1.0)] * 4000
    tokens = sample(logits, SamplingBatch(params, [None] * 4000)).token_ids
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.04)


SAMPLERS = ["sort"] + (["kernel"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_top_p_cuts_the_distribution_top_k_left(sampler):
    """Top-k first, then top-p on the renormalised rest (as HF and vLLM order them), from one sort
    or from roseinfer_kernels.filtered_sampling's race (what the sampling graphs may take instead, checked
    here draw for draw against the sort on the same noise, over fewer rows: the interpreter is
    slow): of 0.4 / 0.3 / 0.2 / 0.1, top-k 3 leaves 0.44 / 0.33 / 0.22, whose first two reach top-p
    0.75 (on the raw probabilities the first three would); min-p 0.8 then drops the second."""
    from engine.sampler import sample_rows

    rows = 4000 if sampler == "sort" else 48
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().repeat(rows, 1)
    noise = torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(3))
    greedy, temperature = torch.zeros(rows, dtype=torch.bool), torch.ones(rows)
    top_k, top_p = torch.full((rows,), 3), torch.full((rows,), 0.75)
    draws = {"top-k, top-p": (top_k, top_p, None), "and min-p": (top_k, top_p, torch.full((rows,), 0.8)),
             "top-p alone": (None, top_p, None)}
    tokens = {name: sample_rows(logits, greedy, temperature, *filters, noise) for name, filters in draws.items()}
    if sampler == "kernel":
        from roseinfer_kernels.filtered_sampling import filtered_sample

        for name, filters in draws.items():
            assert torch.equal(sample_rows(logits, greedy, temperature, *filters, noise, filtered_sample),
                               tokens[name]), name
        return
    freq = torch.bincount(tokens["top-k, top-p"], minlength=4).float() / rows
    assert torch.allclose(freq, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]), atol=0.04)
    assert (tokens["and min-p"] == 0).all()
    assert set(tokens["top-p alone"].tolist()) == {0, 1, 2}  # 0.4 + 0.3 < 0.75


def test_eager_steps_draw_as_the_sampling_graphs_of_their_size_decided():
    """A runner with CUDA graphs hands eager steps (seeded rows, a prompt's first token) the draw
    its sampling graphs measured fastest at the nearest captured batch size, for the batch's
    variant (filtered or not); with the sampling kernel (where Triton runs: the interpreter here),
    seeded rows draw the tokens torch's sort draws."""
    from types import SimpleNamespace

    from engine.model_runner import ModelRunner

    from engine.sampler import FILTERED, PLAIN, TOP_K

    filtered_kernel, plain_kernel = object(), object()
    graphs = SimpleNamespace(sampling_kernel={(4, FILTERED): filtered_kernel, (4, PLAIN): plain_kernel, (4, TOP_K): None,
                                              (8, FILTERED): None, (8, PLAIN): None, (8, TOP_K): None},
                             batch_sizes=[4, 8], fits=lambda n: n <= 8, padded_size=lambda n: 4 if n <= 4 else 8)
    runner = SimpleNamespace(graphs=graphs, model_config=SimpleNamespace(vocab_size=100, eos_token_ids=(0,)),
                             _generator=lambda seq: None)
    top_p, plain = SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.7)

    def kernel_for(params: list[SamplingParams]):
        return ModelRunner.sampling_batch(runner, [SimpleNamespace(params=p) for p in params]).kernel

    assert kernel_for([top_p, plain, plain]) is filtered_kernel and kernel_for([plain] * 3) is plain_kernel
    assert kernel_for([top_p, SamplingParams(temperature=0.7, top_k=5)]) is None  # a top-k row: TOP_K's decision
    assert kernel_for([top_p] * 6) is None and kernel_for([top_p] * 20) is None  # past the largest: its decision
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from roseinfer_kernels.filtered_sampling import filtered_sample

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) * 3
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i) for i in range(3)] + \
             [SamplingParams(temperature=1.2, top_k=20, min_p=0.05, seed=i) for i in range(3)]
    draws = []
    for kernel in (None, filtered_sample):
        batch = SamplingBatch(params, [torch.Generator().manual_seed(p.seed) for p in params], kernel=kernel)
        draws.append(sample(logits, batch).token_ids)
    assert torch.equal(draws[0], draws[1])


def test_bitmask_limits_greedy_and_sampled_rows_and_logprobs_stay_raw():
    """Token t allowed where bit t % 32 of word t // 32 is set. Greedy takes the best allowed
    token, sampled rows draw only allowed ones, a row of all ones is untouched, and log-
    probabilities describe the model's own distribution, before the mask."""
    vocab = 40
    logits = torch.arange(vocab, dtype=torch.float32).repeat(3, 1)  # token 39 is the model's favourite
    bitmask = torch.zeros(3, 2, dtype=torch.int32)
    bitmask[0, 0] = (1 << 3) | (1 << 5)  # tokens 3 and 5
    bitmask[1, 1] = 1 | (1 << 2)  # tokens 32 and 34
    bitmask[2] = -1
    params = [SamplingParams(temperature=0.0, logprobs=1), SamplingParams(temperature=5.0), SamplingParams(temperature=0.0)]
    for _ in range(20):
        out = sample(logits.clone(), SamplingBatch(params, [None] * 3, allowed_token_bitmask=bitmask))
        token_ids = out.token_ids.tolist()
        assert token_ids[0] == 5 and token_ids[1] in (32, 34) and token_ids[2] == 39
        assert out.logprobs[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[5].item())


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"stop": ("",)}, "stop"),
        ({"temperature": float("nan")}, "temperature"),
        ({"seed": 2**64}, "seed"),  # would break torch.Generator inside the step, failing the whole batch
    ],
)
def test_invalid_sampling_values_raise_typed_errors(kwargs, param):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_invalid_requests_never_break_the_engine(tiny_llm):
    engine = tiny_llm.engine
    with pytest.raises(InvalidRequest):
        engine.add_request("e1", "", SamplingParams())
    with pytest.raises(InvalidRequest):
        engine.add_request("e2", [], SamplingParams())
    with pytest.raises(InvalidRequest):
        engine.add_request("e3", [10**9], SamplingParams())
    with pytest.raises(ContextLengthExceeded):
        engine.add_request("e4", "word " * 2000, SamplingParams())
    with pytest.raises(ContextLengthExceeded):
        engine.add_request("e5", "hello", SamplingParams(max_tokens=engine.max_model_len))
    assert not engine.has_unfinished()
    assert gen(tiny_llm, SamplingParams(max_tokens=3, temperature=0.0)).token_ids


def test_unknown_model_is_a_typed_error():
    from engine import LLM, UnknownModel

    with pytest.raises(UnknownModel):
        LLM("no-such-model-anywhere")
