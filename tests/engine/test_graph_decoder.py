"""The CUDA-graph decoder (engine.model_runner.CudaGraphDecoder) itself, on the CPU: its Triton
kernels under the interpreter, and a stand-in for the CUDA runtime where a "graph" is its body run
again on replay (with the values its closure had when it was captured, as a real capture keeps
the launches of that moment) and pinned memory, streams and events do nothing. So the decoder's
buffers, staging, on-device step inputs and graph choices run in CI against the plain engine's
single steps; tests/engine/test_cuda.py runs the real graphs on the GPU host.
"""

from __future__ import annotations

import contextlib
import json
import os
import types

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampling_params import StructuredOutputSpec

PROMPTS = ["Hello world, my name is", "The capital of France is", "def fibonacci(n):"]

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                reason="the decoder's kernels on the CPU need TRITON_INTERPRET=1 (make test sets it)")


class _Graph:
    """A captured body, run again on each replay into the outputs it returned at capture."""

    def __init__(self, body, out) -> None:
        self.body, self.out = body, out

    def replay(self) -> None:
        new = self.body()
        if isinstance(self.out, torch.Tensor):
            self.out.copy_(new)

    def pool(self) -> None:
        return None


def _as_captured(fn):
    """`fn` with its closure's current values: the capture loop's variables move on afterwards."""
    if not fn.__closure__:
        return fn
    cells = tuple(types.CellType(c.cell_contents) for c in fn.__closure__)
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)


class _Nothing:
    """A stream or an event: nothing to order or wait for on the CPU."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record(self, *args) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other) -> float:
        return 0.0


class _TorchWithoutPinning:
    """model_runner's `torch`, whose pinned buffers are plain ones (the CPU has no pinned allocator)."""

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        if name in ("zeros", "ones", "empty", "full"):
            def unpinned(*args, pin_memory: bool = False, **kwargs):
                return value(*args, **kwargs)
            return unpinned
        return value


@pytest.fixture
def graph_llm(monkeypatch, tiny_llama_dir):
    """Build an LLM whose runner decodes through a CudaGraphDecoder captured at batch size 4 (smaller
    batches padded to it; each capture runs its body under the interpreter);
    `forward_s` stands for the timed forward (GREEDY_STEP_GRAPHS_MIN_FORWARD_S decides on it); other
    keyword arguments go to the LLM."""
    from engine import model_runner

    def capture(self, body, pool, stream, kind, warm_runs=1):
        body = _as_captured(body)
        for _ in range(warm_runs):
            body()
        out = body()
        return _Graph(body, out), out

    monkeypatch.setattr(model_runner, "torch", _TorchWithoutPinning())
    monkeypatch.setattr(model_runner, "sampling_kernels", lambda *args, **kwargs: {})  # torch's draw
    monkeypatch.setattr(model_runner.CudaGraphDecoder, "_warm_and_capture", capture)
    for name in ("Stream", "Event"):
        monkeypatch.setattr(torch.cuda, name, _Nothing)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: _Nothing())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)

    def build(forward_s: float, **kwargs) -> LLM:
        monkeypatch.setattr(model_runner.CudaGraphDecoder, "_replay_seconds",
                            staticmethod(lambda graph, stream, replays=3: forward_s))
        llm = LLM(tiny_llama_dir, num_kv_blocks=64, max_num_seqs=4, num_scheduler_steps=4,
                  attention_backend="triton", dtype="float32", **kwargs)
        runner = llm.engine.runner
        runner.graphs = model_runner.CudaGraphDecoder(runner, [4])
        return llm
    return build


@pytest.fixture(scope="module")
def single_steps(tiny_llama_dir):
    return LLM(tiny_llama_dir, num_kv_blocks=64, max_num_seqs=4, num_scheduler_steps=1, attention_backend="triton",
               dtype="float32")


@pytest.mark.parametrize("per_step", [False, True])
def test_greedy_and_sampled_runs_match_single_steps(graph_llm, single_steps, per_step):
    """Greedy runs as one graph of all their steps (a fast forward) or a forward and an argmax graph a
    step (a forward of 2 ms or more), and sampled runs whose filters leave one token, give the
    single-step engine's tokens; the decoder captured what the choice needs and no more."""
    llm = graph_llm(forward_s=1.0 if per_step else 1e-4)
    graphs = llm.engine.runner.graphs
    assert graphs.greedy_step_graphs == per_step
    assert bool(graphs.multi_graphs) != per_step and ((4, None) in graphs.sample_graphs) == per_step
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in single_steps.generate(PROMPTS, greedy)]
    assert [o.token_ids for o in llm.generate(PROMPTS, greedy)] == want
    top1 = SamplingParams(max_tokens=12, temperature=1.0, top_k=1, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(PROMPTS, top1)] == want
    assert graphs.sampled_runs > 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("per_step", [False, True])
def test_runs_over_an_fp8_cache_match_single_steps(graph_llm, tiny_llama_dir, per_step):
    """With the KV cache in float8 e4m3 (`--kv-cache-dtype fp8`, its scales calibrated at load) the
    decoder's graphs write and read the cache as the single-step engine's eager steps do: the same
    greedy tokens, both ways of running greedy steps."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    single = LLM(tiny_llama_dir, num_kv_blocks=64, max_num_seqs=4, num_scheduler_steps=1,
                 attention_backend="triton", dtype="float32", kv_cache_dtype="fp8")
    want = [o.token_ids for o in single.generate(PROMPTS, params)]
    del single
    llm = graph_llm(forward_s=1.0 if per_step else 1e-4, kv_cache_dtype="fp8")
    assert all(kv.dtype == torch.float8_e4m3fn for kv in llm.engine.runner.kv_caches)
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == want
    assert llm.engine.runner.graphs.greedy_step_graphs == per_step
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_constrained_runs_of_any_length_match_single_steps(graph_llm, single_steps, monkeypatch):
    """Constrained rows through the masked-step graphs, in runs that lengthen (4 steps, then 16) and
    chain, each run's first inputs derived on the device by its predecessor's last masked step:
    the single-step engine's tokens, schema-valid JSON, every block freed."""
    import engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "CONSTRAINED_RUN_TARGET_S", 1e9)  # any pace: the longest runs
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 4, "maxItems": 20}
    spec = StructuredOutputSpec.json_schema(schema)
    params = [SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, structured_output=spec),
              SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=48, temperature=0.0, structured_output=spec)]
    want = single_steps.generate(PROMPTS, params)
    llm = graph_llm(forward_s=1e-4)
    from engine.model_runner import CudaGraphDecoder

    spans = []  # a chained run's steps and its successor's, each time a last masked step derives the next inputs
    upload = CudaGraphDecoder.upload_block_tables_through
    monkeypatch.setattr(CudaGraphDecoder, "upload_block_tables_through",
                        lambda self, seqs, ahead: (spans.append(ahead), upload(self, seqs, ahead))[1])
    got = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    for out in (got[0], got[2]):
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), schema)
    graphs = llm.engine.runner.graphs
    assert graphs.grammar_steps_replayed > 0
    assert llm.engine._constrained_run_steps == llm.engine.config.max_constrained_run_steps
    assert spans[:2] == [4 + 4, 4 + 16]  # the first run's pace is known only once it ends
    llm.engine.step()  # a chained run may still be in flight: read it
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.requests


def test_sampled_constrained_runs_replay_the_masked_sampling_graphs(graph_llm, single_steps, monkeypatch):
    """Unseeded sampled rows held to a grammar sample inside the masked-step graphs (the mask, then
    the sampling variant's filters, then the draw); with top-k 1 the draw is the masked argmax, so
    the runs give the single-step engine's tokens, beside a free sampled row and a greedy constrained
    one (which replays the masked argmax graph instead)."""
    from engine.model_runner import CudaGraphDecoder

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                                "tags": {"type": "array", "items": {"enum": ["a", "bb"]}}},
              "required": ["n", "tags"], "additionalProperties": False}
    spec = StructuredOutputSpec.json_schema(schema)
    params = [SamplingParams(max_tokens=32, temperature=0.7, top_k=1, structured_output=spec),
              SamplingParams(max_tokens=32, temperature=1.0, top_k=1, ignore_eos=True),
              SamplingParams(max_tokens=32, temperature=0.0, structured_output=spec),
              SamplingParams(max_tokens=32, temperature=1.3, top_k=1, top_p=0.9, structured_output=spec)]
    prompts = PROMPTS + ["Once upon a time"]  # four rows: the captured batch size
    want = single_steps.generate(prompts, params)
    llm = graph_llm(forward_s=1e-4)
    variants = []
    masked_step = CudaGraphDecoder.masked_step
    monkeypatch.setattr(CudaGraphDecoder, "masked_step",
                        lambda self, bitmask, last, sampling: (variants.append(sampling),
                                                               masked_step(self, bitmask, last, sampling))[1])
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    for out in (got[0], got[2], got[3]):
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), schema)
    assert any(v is not None for v in variants)  # the masked sampling graphs ran
    llm.engine.step()  # a chained run may still be in flight: read it
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.requests


@pytest.mark.parametrize("per_step", [False, True])
def test_cascade_runs_for_a_shared_prompt_prefix_match_single_steps(graph_llm, single_steps, monkeypatch, per_step):
    """Greedy rows that share a cached prompt prefix take the cascade graphs (the prefix read once for
    the batch): one graph a run, or a cascade forward and an argmax graph on its logits a step; the
    single-step engine's tokens. The thresholds are lowered so that three rows take them."""
    from engine import model_runner

    monkeypatch.setattr(model_runner, "CASCADE_MIN_BATCH", 2)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SHARED_TOKENS", 32)
    llm = graph_llm(forward_s=1.0 if per_step else 1e-4)
    graphs = llm.engine.runner.graphs
    assert 4 in graphs.cascade_graphs and (4 in graphs.cascade_step_graphs) == per_step
    prefix = [(37 * i) % 1000 + 10 for i in range(32)]  # two blocks of 16
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    llm.generate([prefix + [5]], greedy)  # fills the prefix cache
    prompts = [prefix + [100 + i] * (1 + i) for i in range(3)]
    want = [o.token_ids for o in single_steps.generate(prompts, greedy)]
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == want
    assert graphs.cascade_runs > 0 and int(graphs.shared_prefix_len) == 32
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
