"""The CUDA path (Triton attention, CUDA graphs, multi-step decode) against HF on the same weights.

Run on the GPU host with `pytest -m gpu`.
"""

import pytest
import torch

from engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = ["Hello world, my name is", "The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a land far, far away, there lived a young girl who"]


def hf_greedy(hf, prompt_ids, n):
    hf.generation_config.eos_token_id = None
    out = hf.generate(torch.tensor([prompt_ids], device="cuda"), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def saved_model(request, tmp_path_factory, tiny_llama_dir):
    if request.param == "llama":
        return tiny_llama_dir
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2-124m")
    torch.manual_seed(1234)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)
    return str(path)


def load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()


def force_greedy_step_graphs(monkeypatch, per_step: bool) -> None:
    """Greedy runs as a graph a step (as for models whose forward is slow), or one graph a run."""
    from engine import model_runner

    monkeypatch.setattr(model_runner, "GREEDY_STEP_GRAPHS_MIN_FORWARD_S", 0.0 if per_step else float("inf"))


@pytest.mark.parametrize("steps, per_step", [(1, False), (8, False), (8, True)])
def test_graphs_and_multistep_match_hf_fp32(saved_model, steps, per_step, monkeypatch):
    force_greedy_step_graphs(monkeypatch, per_step)
    llm = LLM(saved_model, device="cuda", dtype="float32", num_scheduler_steps=steps, kv_cache_memory_bytes=256 * 2**20)
    assert llm.engine.runner.attention.name == "triton" and llm.engine.runner.cuda_graphs_enabled
    graphs = llm.engine.runner.graphs
    assert graphs.greedy_step_graphs == per_step and bool(graphs.multi_graphs) == (steps > 1 and not per_step)
    for kv in llm.engine.runner.kv_caches:
        kv.fill_(float("nan"))  # unwritten slots must never be read
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    hf = load_hf(saved_model)
    for out in outs:
        assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, 40)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("per_step", [False, True])
def test_cascade_graphs_for_a_shared_prompt_prefix_match_hf_fp32(saved_model, monkeypatch, per_step):
    """Greedy runs whose rows start with the same cached prompt prefix replay the cascade graphs
    (the prefix's K/V read once for the batch, then each row's own; one graph a run, or a forward
    and an argmax graph a step) and give HF's tokens. The thresholds are lowered so that a small
    batch takes them."""
    from engine import model_runner

    force_greedy_step_graphs(monkeypatch, per_step)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_BATCH", 16)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SHARED_TOKENS", 64)
    llm = LLM(saved_model, device="cuda", dtype="float32", kv_cache_memory_bytes=256 * 2**20)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prefix = [(37 * i) % 1000 + 10 for i in range(80)]  # five blocks of 16
    llm.generate([prefix + [5]], params)  # fills the prefix cache
    prompts = [prefix + [100 + i] * (1 + i % 5) for i in range(20)]
    outs = llm.generate(prompts, params)
    graphs = llm.engine.runner.graphs
    assert graphs.cascade_runs > 0 and int(graphs.shared_prefix_len) == 80
    hf = load_hf(saved_model)
    for out in outs:
        assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, 24)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_sampling_kernels_are_decided_per_batch_size_and_sample_like_torch():
    """How the sampling graphs draw, measured once at capture (engine.sampler.sampling_kernels): a
    choice for every batch size and sampling variant, and whichever it is, rows whose filters leave
    one token take the argmax, a top-k 5 row stays in its top 5, and the sampling kernel draws
    torch's tokens (each variant with its filters)."""
    from engine.sampler import PLAIN, SAMPLING_VARIANTS, TOP_K, sample_rows, sampling_kernels

    sizes, vocab = [1, 4, 16, 64, 256], 50257
    choice = sampling_kernels(torch.device("cuda"), vocab, sizes)
    assert set(choice) == {(n, v) for n in sizes for v in SAMPLING_VARIANTS}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for (n, variant), kernel in choice.items():
        logits = torch.randn(n, vocab, device="cuda", generator=gen) * 3
        top_k = torch.tensor([1, 5, vocab, vocab] * (n // 4 + 1), device="cuda")[:n] if variant == TOP_K else None
        top_p = torch.tensor([1.0, 1.0, 1e-6, 0.9] * (n // 4 + 1), device="cuda")[:n] if variant != PLAIN else None
        noise = torch.empty_like(logits).exponential_(generator=gen)
        ones, greedy = torch.ones(n, device="cuda"), torch.zeros(n, dtype=torch.bool, device="cuda")
        got = sample_rows(logits, greedy, ones, top_k, top_p, None, noise, kernel)
        if variant == PLAIN:
            assert int((got != (logits - noise.log()).argmax(dim=-1)).sum()) <= n // 64
            continue
        if kernel is not None:
            assert int((got != sample_rows(logits, greedy, ones, top_k, top_p, None, noise)).sum()) <= n // 64
        single = top_p < 1e-3 if top_k is None else (top_k == 1) | (top_p < 1e-3)
        assert torch.equal(got[single], logits.argmax(dim=-1)[single])
        if top_k is not None:
            top5 = logits.topk(5, dim=-1).indices
            assert all(int(got[i]) in top5[i].tolist() for i in range(n) if int(top_k[i]) == 5)


def test_fp16_paths_agree(saved_model):
    """Eager torch attention and the graph/Triton path give the same greedy tokens in fp16 for most prompts."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    fast = LLM(saved_model, device="cuda", dtype="float16", kv_cache_memory_bytes=128 * 2**20).generate(PROMPTS, params)
    slow = LLM(saved_model, device="cuda", dtype="float16", attention_backend="torch", enforce_eager=True,
               kv_cache_memory_bytes=128 * 2**20).generate(PROMPTS, params)
    same = sum(a.token_ids[:8] == b.token_ids[:8] for a, b in zip(fast, slow))
    assert same >= len(PROMPTS) - 1


def test_abort_and_preemption_on_cuda(saved_model):
    llm = LLM(saved_model, device="cuda", dtype="float32", num_kv_blocks=24, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    ref = LLM(saved_model, device="cuda", dtype="float32", kv_cache_memory_bytes=64 * 2**20).generate(PROMPTS * 2, params)
    got = llm.generate(PROMPTS * 2, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert llm.engine.scheduler.num_preemptions > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_pipelined_runs_survive_batch_changes_and_aborts(saved_model):
    """Greedy multi-step runs are chained on the device before the host reads them. Requests that
    end at different times (max_tokens, a stop token inside a run) and an abort while a run is in
    flight must give the eager path's tokens and leave every block free."""
    kv = dict(device="cuda", dtype="float32", kv_cache_memory_bytes=128 * 2**20)
    eager = LLM(saved_model, enforce_eager=True, **kv)
    plain = SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True)
    ref = eager.generate(PROMPTS, plain)
    stop_id = ref[1].token_ids[37]  # request 1 stops inside a chained run
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (90, 90, 27, 61)]
    params[1] = SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_id,))
    want = eager.generate(PROMPTS, params)

    llm = LLM(saved_model, **kv)
    engine = llm.engine
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == [o.token_ids for o in want]
    assert want[1].token_ids[-1] == stop_id and len(want[1].token_ids) <= 38

    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"a{i}", prompt, plain)
    chained = 0
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        chained += engine._inflight is not None
        if engine._inflight is not None and "a3" in engine.requests and len(got.get("a3", [])) > 20:
            engine.abort_request("a3")  # its next run is already on the device
    assert chained > 0, "the pipeline never chained a run"
    assert "a3" in got and len(got["a3"]) < 90
    for i in range(3):
        assert got[f"a{i}"] == ref[i].token_ids
    engine.step()  # drain whatever is still in flight
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_mixed_step_graphs_match_hf_fp32(saved_model):
    """Steps that carry prompt tokens replay per-token-count graphs: prompt chunks beside decodes
    (requests arriving while others decode, a small budget that chunks long prompts) and prefix
    cache hits, with the cache poisoned so that a stray read shows. Tokens equal HF's and the eager
    mixed steps', and every block comes back."""
    kv = dict(device="cuda", dtype="float32", kv_cache_memory_bytes=128 * 2**20, max_num_batched_tokens=48)
    llm = LLM(saved_model, **kv)
    runner = llm.engine.runner
    assert runner.mixed_graphs is not None and runner.mixed_graphs.buckets == [16, 32, 48]
    for cache in runner.kv_caches:
        cache.fill_(float("nan"))
    long = PROMPTS[3] + " " + PROMPTS[3]  # longer than the budget: chunked
    prompts = [PROMPTS[0], long, PROMPTS[1], PROMPTS[3] + " and", PROMPTS[2]]  # the 4th shares blocks with the 2nd
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine = llm.engine
    got: dict[str, list[int]] = {}
    prompt_ids = []
    for i, prompt in enumerate(prompts):  # one arrival every few steps: prefill beside decodes
        prompt_ids.append(engine.add_request(f"r{i}", prompt, params).prompt_token_ids)
        for _ in range(3):
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert runner.mixed_graphs.replays > len(prompts)
    assert engine.block_manager.prefix_cache_hits > 0
    hf = load_hf(saved_model)
    for i, ids in enumerate(prompt_ids):
        assert got[f"r{i}"] == hf_greedy(hf, ids, 30), f"request {i}"
    eager = LLM(saved_model, cuda_graph_max_tokens=0, **kv)
    assert eager.engine.runner.mixed_graphs is None
    assert [o.token_ids for o in eager.generate(prompts, params)] == [got[f"r{i}"] for i in range(len(prompts))]
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_constrained_and_sampled_runs_match_single_steps(saved_model):
    """Constrained rows (each step masked by its grammar, tokens read back between steps while the
    next forward is queued) and seeded sampled rows run in multi-step runs on the graphs: same
    tokens and finish reasons as single steps (num_scheduler_steps=1), schema-valid JSON."""
    import json

    import jsonschema

    from engine.sampling_params import StructuredOutputSpec

    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 4, "maxItems": 9}
    spec = StructuredOutputSpec.json_schema(schema)
    params = [SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True, structured_output=spec),
              SamplingParams(max_tokens=80, temperature=1.0, seed=5, structured_output=spec),
              SamplingParams(max_tokens=80, temperature=0.9, seed=6),
              SamplingParams(max_tokens=45, temperature=0.0, ignore_eos=True)]
    kv = dict(device="cuda", dtype="float32", kv_cache_memory_bytes=128 * 2**20)
    want = LLM(saved_model, num_scheduler_steps=1, **kv).generate(PROMPTS, params)
    got = LLM(saved_model, **kv).generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    for out in got[:2]:
        jsonschema.validate(json.loads(out.text), schema)


def test_greedy_constrained_runs_replay_the_masked_step_graphs(saved_model):
    """A greedy batch with constrained rows: each step of its multi-step runs is the masked-argmax
    graph (bitmask uploaded, next inputs derived on the device) and the forward graph. Same tokens
    and finish reasons as single steps, schema-valid JSON, and the graphs did run."""
    import json

    import jsonschema

    from engine.sampling_params import StructuredOutputSpec

    schema = {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "maxItems": 5}}}
    spec = StructuredOutputSpec.json_schema(schema)
    params = [SamplingParams(max_tokens=70, temperature=0.0, structured_output=spec),
              SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=70, temperature=0.0, structured_output=spec),
              SamplingParams(max_tokens=70, temperature=0.0, ignore_eos=True, structured_output=spec)]
    kv = dict(device="cuda", dtype="float32", kv_cache_memory_bytes=128 * 2**20)
    want = LLM(saved_model, num_scheduler_steps=1, **kv).generate(PROMPTS, params)
    llm = LLM(saved_model, **kv)
    got = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert llm.engine.runner.graphs.grammar_steps_replayed > 0
    for out in (got[0], got[2], got[3]):
        jsonschema.validate(json.loads(out.text), schema)


def test_sampled_runs_replay_the_sampling_graphs(saved_model):
    """Unseeded sampled rows decode in pipelined multi-step runs (forward graph, then the step's
    captured sampling graph), chained: rows whose filters leave one token give the greedy tokens,
    in both the temperature-only variant (greedy beside a sampled row) and the filtered one."""
    kv = dict(device="cuda", dtype="float32", kv_cache_memory_bytes=128 * 2**20)
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want = LLM(saved_model, num_scheduler_steps=1, **kv).generate(PROMPTS, greedy)
    llm = LLM(saved_model, **kv)
    graphs = llm.engine.runner.graphs
    plain = [greedy, greedy, greedy, SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True)]
    got = llm.generate(PROMPTS, plain)
    assert [o.token_ids for o in got[:3]] == [o.token_ids for o in want[:3]] and len(got[3].token_ids) == 40
    filtered = [SamplingParams(max_tokens=40, temperature=0.9, top_k=1, ignore_eos=True),
                SamplingParams(max_tokens=40, temperature=1.0, top_p=1e-6, ignore_eos=True),
                greedy, SamplingParams(max_tokens=40, temperature=1.0, min_p=0.5, top_k=3, ignore_eos=True)]
    got = llm.generate(PROMPTS, filtered)
    assert [o.token_ids for o in got[:3]] == [o.token_ids for o in want[:3]]
    assert graphs.sampled_runs >= 2
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_sampled_constrained_runs_replay_the_masked_sampling_graphs(saved_model):
    """Unseeded sampled rows with a grammar sample inside the masked-step graphs: rows whose filters
    leave one allowed token give the single-step tokens; a temperature-1 row's JSON is valid."""
    import json

    import jsonschema

    from engine.sampling_params import StructuredOutputSpec

    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 6}
    spec = StructuredOutputSpec.json_schema(schema)
    params = [SamplingParams(max_tokens=70, temperature=0.7, top_k=1, structured_output=spec),
              SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=70, temperature=1.0, top_p=1e-6, structured_output=spec),
              SamplingParams(max_tokens=70, temperature=1.0, structured_output=spec)]
    kv = dict(device="cuda", dtype="float32", kv_cache_memory_bytes=128 * 2**20)
    want = LLM(saved_model, num_scheduler_steps=1, **kv).generate(PROMPTS, params)
    llm = LLM(saved_model, **kv)
    got = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in got[:3]] == [o.token_ids for o in want[:3]]
    assert llm.engine.runner.graphs.grammar_steps_replayed > 0
    for out in (got[0], got[2], got[3]):
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), schema)


def test_grammar_workers_pin_their_bitmask_engine_after_engine():
    """Each engine's grammar workers page-lock their shared bitmask, also after an earlier engine's
    were collected without close() (its registration is dropped with it, not left on the unmapped
    range the next segment is often mapped over); a registration that fails anyway leaves no CUDA
    error behind for the next kernel launch to raise."""
    import gc

    from engine.grammar_workers import GrammarWorkers, _pin
    from engine.structured_output import StructuredOutputs
    from engine.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    for _ in range(3):
        outputs = StructuredOutputs.for_tokenizer(tok, 50257, (50256,), pin_bitmask=True)
        workers = GrammarWorkers.start(outputs, 1, max_rows=8)
        assert workers._pinned == [workers.bitmask.data_ptr()]
        del workers, outputs  # no close(): collected
        gc.collect()
        assert torch.ones(4, device="cuda").sum().item() == 4
    outputs = StructuredOutputs.for_tokenizer(tok, 50257, (50256,), pin_bitmask=True)
    workers = GrammarWorkers.start(outputs, 1, max_rows=8)
    try:
        assert not _pin(workers.bitmask.data_ptr(), 4096)  # registered already: fails
        assert torch.ones(4, device="cuda").sum().item() == 4  # and the next launch is clean
    finally:
        outputs.close()
