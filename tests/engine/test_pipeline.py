"""The engine's pipelined multi-step decode (a greedy run chained before the previous one is read),
on the CPU: a stand-in for the CUDA-graph decoder runs the same steps eagerly, so the engine's
chaining, draining and abort logic runs in CI. The real graphs run the same tests' twin in
tests/engine/test_cuda.py on the GPU host.
"""

from __future__ import annotations

import pytest
import torch

import json
import os

import jsonschema

from engine import LLM, SamplingParams
from engine.attention import AttentionMetadata
from engine.sampling_params import StructuredOutputSpec

PROMPTS = ["Hello world, my name is", "The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a land far, far away, there lived a young girl who"]


class _Ready:
    """What PendingTokens offers the engine: the tokens of each step, and the device time."""

    def __init__(self, tokens: list[list[int]]) -> None:
        self.tokens = tokens
        self.gpu_s = 0.0

    def wait(self) -> list[list[int]]:
        return self.tokens


class EagerGraphDecoder:
    """CudaGraphDecoder's interface, computed eagerly at launch. A chained launch continues from
    the previous run's last tokens and positions, which the host has not read yet, exactly as the
    captured graph does from its device buffers."""

    def __init__(self, runner, multi_steps: int) -> None:
        self.runner = runner
        self.multi_steps = multi_steps
        self.batch_sizes = [runner.config.max_num_seqs]
        self.last_ids: list[int] = []
        self.last_first_pos: list[int] = []
        self.launches = {"fresh": 0, "chained": 0}
        self.steps_ahead = 0  # run_decode calls past a run's first step (sampled or constrained runs)
        self.chained_runs = 0  # runs started on a previous run's unread tokens (constrained runs)
        self.chained_spans: list[int] = []  # steps of a constrained run and of the one chained onto it
        self.grammar_steps_replayed = 0  # constrained steps through the masked-step "graph"
        self.sampled_runs = 0

    # Truthy: constrained runs take the masked-step path (masked_step, replay_decode) as they do on
    # CUDA; the steps below compute eagerly what those graphs compute.
    grammar_graphs = {"eager": None}
    samples_in_graphs = True  # sampled runs are pipelined too (launch_sampled_steps)
    sampling_kernel: dict = {}  # torch's draw everywhere (sampling_kernels measures none here)

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.batch_sizes[-1]

    def _decode(self, seqs, ids: list[int], positions: list[int], tables: list[list[int]] | None = None) -> torch.Tensor:
        """One decode step; `tables` (default: the sequences' own) as they were when a run started."""
        bs = self.runner.block_size
        tables = [list(s.block_table) for s in seqs] if tables is None else tables
        max_blocks = max(p // bs for p in positions) + 1
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]),
            query_start_loc=torch.arange(len(seqs) + 1, dtype=torch.int32),
            seq_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32),
            block_tables=torch.tensor([t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in tables],
                                      dtype=torch.int32),
            max_query_len=1, max_seq_len=max(positions) + 1,
            query_start_loc_host=list(range(len(seqs) + 1)), seq_lens_host=[p + 1 for p in positions],
        )
        model = self.runner.model
        with torch.inference_mode():
            return model.compute_logits(model(torch.tensor(ids), torch.tensor(positions), self.runner.kv_caches, meta))

    def run_decode(self, seqs, offset: int = 0, device_input_ids=None, num_steps: int = 1, ahead: int = 0) -> torch.Tensor:
        """`offset` steps into a run whose positions and block tables were fixed at its first step
        (as the CUDA decoder stages them); `ahead`: the run starts that many tokens past the host's
        sequences, on `device_input_ids` (a chained run)."""
        if offset == 0:
            self.run_seqs = list(seqs)
            self.run_first_pos = [s.num_tokens - 1 + ahead for s in seqs]
            self.run_tables = [list(s.block_table) for s in seqs]
        ids = [s.token_ids[-1] for s in seqs] if device_input_ids is None else device_input_ids[: len(seqs)].tolist()
        self.steps_ahead += offset > 0
        self.chained_runs += offset == 0 and ahead > 0
        self.last_logits = self._decode(seqs, ids, [p + offset for p in self.run_first_pos], self.run_tables)
        return self.last_logits

    def start_grammar_steps(self, n: int) -> None:
        self.grammar_offset = 0  # the run's step whose forward ran last

    def upload_block_tables_through(self, seqs, steps_ahead: int) -> None:
        """A chained constrained run's next forwards continue on the device from the last masked
        step (replay_decode), with the block tables as they are now: steps past the tables
        uploaded before would index blocks they lack."""
        self.run_tables = [list(s.block_table) for s in seqs]
        self.chained_runs += 1
        self.chained_spans.append(steps_ahead)

    def set_row_params(self, params) -> int:
        from engine.sampler import TOP_K

        self.row_pick = self._sampler(params)
        return TOP_K  # the variant with every filter on, as _sampler applies them

    def masked_step(self, bitmask: torch.Tensor, last: bool, sampling: int | None) -> torch.Tensor:
        from engine.sampler import mask_disallowed_tokens_

        self.grammar_steps_replayed += 1
        masked = mask_disallowed_tokens_(self.last_logits.clone(), bitmask)
        tokens = masked.argmax(dim=-1) if sampling is None else self.row_pick(masked)
        self.grammar_next_ids = tokens.tolist()
        return tokens

    def replay_decode(self, n: int) -> torch.Tensor:
        self.grammar_offset += 1
        self.steps_ahead += 1
        positions = [p + self.grammar_offset for p in self.run_first_pos]
        self.last_logits = self._decode(self.run_seqs, self.grammar_next_ids, positions, self.run_tables)
        return self.last_logits

    def launch_greedy_steps(self, seqs, chained: bool) -> _Ready:
        return self._launch(seqs, chained, lambda logits: logits.argmax(dim=-1))

    def launch_sampled_steps(self, seqs, chained: bool) -> _Ready:
        self.sampled_runs += 1
        return self._launch(seqs, chained, self._sampler([s.params for s in seqs]))

    def _sampler(self, ps):
        """As the decoder's sampling graphs: every filter on, each row's own parameters."""
        from engine.sampler import row_sampling_values, sample_rows

        rows = {name: torch.tensor(values) for name, values in
                row_sampling_values(ps, self.runner.model_config.vocab_size).items()}
        return lambda logits: sample_rows(logits, rows["greedy"], rows["temperature"], rows["top_k"], rows["top_p"],
                                          rows["min_p"], torch.empty_like(logits).exponential_())

    def _launch(self, seqs, chained: bool, pick) -> _Ready:
        self.launches["chained" if chained else "fresh"] += 1
        if chained:
            ids, first = self.last_ids, [p + self.multi_steps for p in self.last_first_pos]
        else:
            ids, first = [s.token_ids[-1] for s in seqs], [s.num_tokens - 1 for s in seqs]
        steps = []
        for i in range(self.multi_steps):
            ids = pick(self._decode(seqs, ids, [p + i for p in first])).tolist()
            steps.append(ids)
        self.last_ids, self.last_first_pos = ids, first
        return _Ready(steps)


def run_aborting_in_flight(engine, prefix: str, params: SamplingParams, victim: str, after: int
                           ) -> tuple[dict[str, list[int]], bool]:
    """PROMPTS as requests `prefix`0..3, stepped to the end; `victim` is aborted once it has `after`
    tokens while a run is in flight (its share of the next run already on the device). Returns the
    tokens each request got, and whether the abort happened."""
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"{prefix}{i}", prompt, params)
    got: dict[str, list[int]] = {}
    aborted = False
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        if not aborted and engine._inflight is not None and victim in engine.requests \
                and len(got.get(victim, [])) >= after:
            aborted = engine.abort_request(victim)
    return got, aborted


def pipelined_llm(path: str, steps: int = 4) -> LLM:
    llm = LLM(path, num_kv_blocks=128, max_num_seqs=8, num_scheduler_steps=steps)
    llm.engine.runner.graphs = EagerGraphDecoder(llm.engine.runner, steps)
    return llm


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return LLM(tiny_llama_dir, num_kv_blocks=128, max_num_seqs=8, num_scheduler_steps=1)


def test_chained_runs_give_the_plain_engine_tokens(tiny_llama_dir, reference):
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (40, 40, 13, 29)]
    want = reference.generate(PROMPTS, params)
    stop_id = want[1].token_ids[21]  # request 1 stops on a token inside a chained run
    params[1] = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_id,))
    want = reference.generate(PROMPTS, params)
    assert want[1].finish_reason == "stop" and len(want[1].token_ids) < 40

    llm = pipelined_llm(tiny_llama_dir)
    got = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    launches = llm.engine.runner.graphs.launches
    assert launches["chained"] > 0 and launches["fresh"] > 1  # it chained, and drained when the batch changed
    llm.engine.step()  # drain a run that may still be in flight
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_while_a_run_is_in_flight(tiny_llama_dir, reference):
    plain = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    want = reference.generate(PROMPTS, plain)
    llm = pipelined_llm(tiny_llama_dir)
    engine = llm.engine
    got, aborted_in_flight = run_aborting_in_flight(engine, "a", plain, victim="a3", after=12)  # next run launched
    assert aborted_in_flight
    assert 12 <= len(got["a3"]) < 60 and got["a3"] == want[3].token_ids[: len(got["a3"])]
    for i in range(3):
        assert got[f"a{i}"] == want[i].token_ids
    engine.step()
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.requests


def test_waiting_requests_join_when_the_batch_has_room(tiny_llama_dir, reference):
    """A request arriving mid-pipeline drains it and is admitted at once (batch not full)."""
    plain = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    want = reference.generate(PROMPTS, plain)
    llm = pipelined_llm(tiny_llama_dir)
    engine = llm.engine
    engine.add_request("first", PROMPTS[0], plain)
    got: dict[str, list[int]] = {}
    while engine._inflight is None:
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    engine.add_request("late", PROMPTS[1], plain)
    for out in engine.step():  # reads the run in flight without chaining another
        got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert engine._inflight is None and engine.scheduler.waiting
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert got["first"] == want[0].token_ids and got["late"] == want[1].token_ids


def test_one_token_prompt_gets_its_first_token_after_one_step(tiny_llama_dir, reference):
    """The first step of a one-token prompt (a prefill that looks like a decode step) must not
    start a multi-step run: time to first token is one step, not num_scheduler_steps."""
    plain = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    want = reference.generate([[314]], plain)[0].token_ids
    llm = pipelined_llm(tiny_llama_dir)
    engine = llm.engine
    engine.add_request("one", [314], plain)
    (first,) = engine.step()
    assert first.new_token_ids == want[:1] and engine._inflight is None
    assert llm.engine.runner.graphs.launches == {"fresh": 0, "chained": 0}
    got = list(first.new_token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            got.extend(out.new_token_ids)
    assert got == want and llm.engine.runner.graphs.launches["fresh"] >= 1


def test_sampled_batches_run_pipelined_like_greedy_ones(tiny_llama_dir, reference):
    """Rows without seeds sample in pipelined multi-step runs (the decoder's sampling graphs), chained
    as greedy runs are: rows whose filters leave one token (top_k=1, a tiny top_p) give the greedy
    tokens; a seeded batch keeps the step-by-step path (its generators)."""
    params = [SamplingParams(max_tokens=40, temperature=0.9, top_k=1, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=1.0, top_p=1e-6, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=1.3, ignore_eos=True)]
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want = reference.generate(PROMPTS, greedy)
    llm = pipelined_llm(tiny_llama_dir)
    got = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in got[:3]] == [o.token_ids for o in want[:3]]
    assert len(got[3].token_ids) == 40 and got[3].token_ids != want[3].token_ids
    graphs = llm.engine.runner.graphs
    assert graphs.sampled_runs > 0 and graphs.launches["chained"] > 0
    runs = graphs.sampled_runs
    seeded = [SamplingParams(max_tokens=20, temperature=1.0, seed=i, ignore_eos=True) for i in range(4)]
    assert [o.token_ids for o in llm.generate(PROMPTS, seeded)] == [o.token_ids for o in reference.generate(PROMPTS, seeded)]
    assert graphs.sampled_runs == runs


def test_a_run_one_step_past_max_tokens_drops_that_token(tiny_llama_dir, reference):
    """1 + 4 + 4 + 3 tokens with 4-step runs: the last run is a whole one, its fourth token dropped."""
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = reference.generate([PROMPTS[1]], plain)[0]
    llm = pipelined_llm(tiny_llama_dir)
    got = llm.generate([PROMPTS[1]], plain)[0]
    assert got.token_ids == want.token_ids and got.finish_reason == "length" and len(got.token_ids) == 12
    assert llm.engine.runner.graphs.launches["fresh"] + llm.engine.runner.graphs.launches["chained"] == 3
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.fixture
def fixed_constrained_runs(monkeypatch):
    """Constrained runs of num_scheduler_steps steps whatever this host's pace (not
    CONSTRAINED_RUN_TARGET_S over the last run's step time), so the runs and chains these tests
    check come out the same on any host."""
    from engine import llm_engine

    monkeypatch.setattr(llm_engine, "CONSTRAINED_RUN_TARGET_S", 0.0)


def grammars_compiled(llm: LLM, params: list[SamplingParams]) -> LLM:
    """`llm` with the grammars of `params` compiled into its cache: constrained requests then join
    the batch at its first step, together with the free ones. (Compiled on a thread as they arrive,
    a grammar finishing a few steps late, as it may on a busy host, changes the batch mid-way
    and leaves no unchanged batch to chain runs on.)"""
    for p in params:
        if p.structured_output is not None:
            llm.engine.structured.compile_async(p.structured_output).result()
    return llm


def test_constrained_rows_decode_in_runs_with_the_single_step_tokens(tiny_llama_dir, reference, fixed_constrained_runs):
    """Constrained rows (greedy and seeded) share multi-step runs with free ones: each step masked
    by its grammar, which takes each token before the next step's mask. A grammar that completes
    inside a run ends its request there (the row's later tokens are dropped). Same tokens, texts
    and finish reasons as single steps; blocks all freed."""
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 3, "maxItems": 6}
    spec = StructuredOutputSpec.json_schema(schema)
    # ignore_eos: only the grammar's end stops request 0 (its stop token is EOS)
    params = [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True, structured_output=spec),
              SamplingParams(max_tokens=60, temperature=1.0, seed=3, structured_output=spec),
              SamplingParams(max_tokens=60, temperature=1.0, seed=4, structured_output=StructuredOutputSpec(
                  "regex", r"(ab|cd){2,9}!")),
              SamplingParams(max_tokens=37, temperature=0.0, ignore_eos=True)]
    want = reference.generate(PROMPTS, params)
    llm = grammars_compiled(pipelined_llm(tiny_llama_dir), params)
    got = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    assert [o.finish_reason for o in got] == ["stop", "stop", "stop", "length"]
    for out in got[:2]:
        jsonschema.validate(json.loads(out.text), schema)
    assert llm.engine.runner.graphs.steps_ahead > 0  # the constrained batch ran in multi-step runs
    assert llm.engine.runner.graphs.chained_runs > 0  # ... and chained them while outputs were processed
    llm.engine.step()  # a chained run may still be in flight: read it
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.requests


def test_greedy_constrained_runs_take_the_masked_step_path(tiny_llama_dir, reference, fixed_constrained_runs):
    """A greedy batch with constrained rows: each step is the masked argmax (the bitmask applied to
    the last forward's logits) and then the forward on its tokens, as the CUDA decoder's two graphs
    do, runs chained while outputs are processed. Same tokens and finish reasons as single steps."""
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 3, "maxItems": 6}
    spec = StructuredOutputSpec.json_schema(schema)
    params = [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True, structured_output=spec),
              SamplingParams(max_tokens=60, temperature=0.0, structured_output=StructuredOutputSpec("regex", r"(ab|cd){2,9}!")),
              SamplingParams(max_tokens=37, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=60, temperature=0.0, structured_output=spec)]
    want = reference.generate(PROMPTS, params)
    llm = grammars_compiled(pipelined_llm(tiny_llama_dir), params)
    got = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    graphs = llm.engine.runner.graphs
    assert graphs.grammar_steps_replayed > 0 and graphs.chained_runs > 0
    for out in (got[0], got[3]):
        jsonschema.validate(json.loads(out.text), schema)
    llm.engine.step()  # a chained run may still be in flight: read it
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.requests


@pytest.mark.parametrize("run_target_s", [1e-9, 10.0])
def test_constrained_runs_last_longer_when_steps_are_fast(tiny_llama_dir, reference, monkeypatch, run_target_s):
    """A constrained run's steps are as many as fit in CONSTRAINED_RUN_TARGET_S at the last run's
    pace, from num_scheduler_steps up to CONSTRAINED_RUN_FACTOR times that; runs of any length, and
    chains from one length to another, give the single-step engine's tokens and free every block."""
    import engine.llm_engine as llm_engine
    from engine.config import CONSTRAINED_RUN_FACTOR

    monkeypatch.setattr(llm_engine, "CONSTRAINED_RUN_TARGET_S", run_target_s)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 8, "maxItems": 30}
    spec = StructuredOutputSpec.json_schema(schema)
    params = [SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True, structured_output=spec)] * 3 + \
        [SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True)]
    want = reference.generate(PROMPTS, params)
    llm = grammars_compiled(pipelined_llm(tiny_llama_dir, steps=4), params)
    got = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    spans = llm.engine.runner.graphs.chained_spans
    if run_target_s < 1:  # steps never fit: every run as long as num_scheduler_steps
        assert spans and set(spans) == {8}
    else:  # the first run's pace is not known before it ends: 4 steps, chained to 4, then 16
        assert spans[:3] == [4 + 4, 4 + 4 * CONSTRAINED_RUN_FACTOR, 2 * 4 * CONSTRAINED_RUN_FACTOR]
    llm.engine.step()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.requests


def test_unseeded_sampled_constrained_runs_take_the_masked_step_path(tiny_llama_dir, reference):
    """Unseeded sampled rows with grammars sample inside the masked-step path too: rows whose filters
    leave one allowed token give the single-step engine's tokens; a temperature-1 row's output
    still follows its schema; seeded rows keep sample() (their generators)."""
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 3, "maxItems": 6}
    spec = StructuredOutputSpec.json_schema(schema)
    params = [SamplingParams(max_tokens=60, temperature=0.8, top_k=1, ignore_eos=True, structured_output=spec),
              SamplingParams(max_tokens=60, temperature=1.0, top_p=1e-6, structured_output=spec),
              SamplingParams(max_tokens=37, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=60, temperature=1.0, structured_output=spec)]
    want = reference.generate(PROMPTS, params)
    llm = pipelined_llm(tiny_llama_dir)
    got = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in got[:3]] == [o.token_ids for o in want[:3]]
    graphs = llm.engine.runner.graphs
    assert graphs.grammar_steps_replayed > 0
    for out in (got[0], got[1], got[3]):
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), schema)
    assert got[0].finish_reason == "stop"
    replayed = graphs.grammar_steps_replayed
    seeded = [SamplingParams(max_tokens=30, temperature=1.0, seed=i, structured_output=spec) for i in range(4)]
    assert [o.token_ids for o in llm.generate(PROMPTS, seeded)] == [o.token_ids for o in reference.generate(PROMPTS, seeded)]
    assert graphs.grammar_steps_replayed == replayed
    llm.engine.step()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.requests


def test_the_sampling_graphs_take_each_rows_parameters():
    """The CUDA decoder's sampling-graph code (`set_row_params`, `_pick_tokens`), run here on the
    CPU: each row's parameters land in its column (padding rows greedy, unfiltered), the variant
    follows the filters the rows use (top-k: TOP_K; top-p or min-p alone: FILTERED; none: PLAIN),
    and rows whose filters leave one token take the argmax."""
    from types import SimpleNamespace

    from engine.model_runner import CudaGraphDecoder
    from engine.sampler import FILTERED, PLAIN, SAMPLING_VARIANTS, TOP_K

    vocab, bs = 1000, 8
    fake = SimpleNamespace(runner=SimpleNamespace(model_config=SimpleNamespace(vocab_size=vocab)),
                           row_params=torch.zeros(5, bs), row_params_host=torch.zeros(5, bs), sampling_kernel={})
    fake._variant = lambda ps: CudaGraphDecoder._variant(fake, ps)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=1),
              SamplingParams(temperature=1.3, top_p=1e-6), SamplingParams(temperature=0.9, top_k=5, min_p=0.2)]
    assert CudaGraphDecoder.set_row_params(fake, params) == TOP_K
    want = torch.tensor([[1, 0, 0, 0, 1, 1, 1, 1], [1.0, 0.7, 1.3, 0.9, 1, 1, 1, 1],
                         [vocab, 1, vocab, 5, vocab, vocab, vocab, vocab], [1, 1, 1e-6, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0.2, 0, 0, 0, 0]], dtype=torch.float32)
    assert torch.allclose(fake.row_params, want)
    logits = torch.randn(bs, vocab, generator=torch.Generator().manual_seed(0)) * 3
    samplers = [{}]  # the sort; and, where Triton kernels run (the interpreter here), the sampling kernel
    if os.environ.get("TRITON_INTERPRET") == "1":
        from roseinfer_kernels.filtered_sampling import filtered_sample

        samplers.append({(bs, variant): filtered_sample for variant in SAMPLING_VARIANTS})
    for fake.sampling_kernel in samplers:
        assert CudaGraphDecoder.set_row_params(fake, params) == TOP_K
        for _ in range(5):
            got = CudaGraphDecoder._pick_tokens(fake, bs, logits, TOP_K)
            assert torch.equal(got[[0, 1, 2, 4, 5, 6, 7]], logits.argmax(dim=-1)[[0, 1, 2, 4, 5, 6, 7]])
            assert int(got[3]) in logits[3].topk(5).indices.tolist()
        # top-p alone: the tiny top-p row takes the argmax, the others draw beyond it
        nucleus = [SamplingParams(temperature=1.0, top_p=1e-6), SamplingParams(temperature=5.0, top_p=0.99)]
        assert CudaGraphDecoder.set_row_params(fake, nucleus) == FILTERED
        draws = torch.stack([CudaGraphDecoder._pick_tokens(fake, bs, logits, FILTERED) for _ in range(5)])
        assert (draws[:, 0] == logits[0].argmax()).all() and len(set(draws[:, 1].tolist())) > 1
        # temperature only: the greedy row (and the greedy padding) take the argmax
        assert CudaGraphDecoder.set_row_params(fake, [SamplingParams(temperature=0.8), SamplingParams(temperature=0.0)]) == PLAIN
        plain = CudaGraphDecoder._pick_tokens(fake, bs, logits, PLAIN)
        assert torch.equal(plain[1:], logits.argmax(dim=-1)[1:])


def test_a_decode_runs_inputs_are_staged_for_every_step_at_once(tiny_llama_dir):
    """The CUDA decoder writes the host inputs of all steps of a run in one numpy pass (its
    `_stage_run`, run here on the CPU over real sequences and block tables): each step's position,
    cache slot and length, the first step's token ids, and padding rows that write nothing."""
    from types import SimpleNamespace

    import numpy as np

    from engine.model_runner import CudaGraphDecoder

    llm = LLM(tiny_llama_dir, num_kv_blocks=64, max_num_seqs=8, block_size=8)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"s{i}", prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    engine.step()  # the prompts, and each request's first token
    seqs = list(engine.scheduler.running)
    steps, bs, block = 8, 8, engine.runner.block_size
    for seq in seqs:  # as the engine allocates a run's blocks up front (crossing block boundaries)
        assert engine.block_manager.allocate(seq, seq.num_tokens - 1 + steps)
    staging = np.full((steps, 4, bs), 99, dtype=np.int64)
    CudaGraphDecoder._stage_run(SimpleNamespace(runner=engine.runner, staging_np=staging), seqs, bs, steps)
    for j, seq in enumerate(seqs):
        assert staging[0, 0, j] == seq.token_ids[-1]
        for i in range(steps):
            pos = seq.num_tokens - 1 + i
            assert staging[i, 1:, j].tolist() == [pos, seq.block_table[pos // block] * block + pos % block, pos + 1]
    assert (staging[1:, 0, :] == 0).all()  # later steps' ids come from the device
    padding = staging[:, :, len(seqs):]
    assert (padding[:, 2] == -1).all() and (padding[:, [0, 1, 3]] == 0).all()


def test_abort_while_a_constrained_run_is_chained(tiny_llama_dir, reference, fixed_constrained_runs):
    """A constrained run chained onto the previous one (its first forward already queued) when a
    request of its batch is aborted: the others keep the single-step tokens; every block returns."""
    spec = StructuredOutputSpec("regex", r"[a-z ]{20,80}\.")
    params = SamplingParams(max_tokens=50, temperature=0.0, structured_output=spec)
    want = reference.generate(PROMPTS, params)
    llm = pipelined_llm(tiny_llama_dir)
    engine = llm.engine
    got, aborted = run_aborting_in_flight(engine, "c", params, victim="c2", after=9)  # its share already queued
    assert aborted and len(got["c2"]) < len(want[2].token_ids)
    assert got["c2"] == want[2].token_ids[: len(got["c2"])]
    for i in (0, 1, 3):
        assert got[f"c{i}"] == want[i].token_ids
    engine.step()
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.requests


def test_a_compiled_grammar_ends_the_chain_so_its_request_joins(tiny_llama_dir):
    """A constrained request waits for its grammar outside the scheduler. Once it has compiled, the
    pipelined runs must not chain on (they would until a running request neared its end): the
    request joins the batch and has its first token long before the others finish."""
    plain = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    llm = pipelined_llm(tiny_llama_dir)
    engine = llm.engine
    engine.add_request("long", PROMPTS[0], plain)
    while engine._inflight is None:
        engine.step()
    engine.add_request("json", PROMPTS[1], SamplingParams(max_tokens=20, temperature=0.0,
                                                          structured_output=StructuredOutputSpec("json_object")))
    engine._compiling["json"].result()  # compiled: it can join now
    long_tokens, json_first = 0, None
    while engine.has_unfinished() and json_first is None:
        for out in engine.step():
            if out.request_id == "long":
                long_tokens += len(out.new_token_ids)
            elif out.new_token_ids:
                json_first = long_tokens
    assert json_first is not None and json_first <= 2 * 4 + 1  # within the run in flight and the next
    while engine.has_unfinished():
        engine.step()


def test_a_random_mix_under_preemption_gives_the_single_step_tokens(tiny_llama_dir):
    """24 requests, each free, held to a JSON schema or to a regex, greedy or seeded, of random
    lengths, through a cache small enough to preempt: multi-step runs (constrained ones chained)
    give the tokens single steps give, every JSON output validates, and every block comes back."""
    import random

    rng = random.Random(0)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 8}
    specs = {"free": None, "json": StructuredOutputSpec.json_schema(schema),
             "regex": StructuredOutputSpec("regex", r"[a-c]{3,12}!")}
    prompts, params = [], []
    for _ in range(24):
        kind, seed = rng.choice(list(specs)), rng.choice([None, rng.randrange(100)])
        params.append(SamplingParams(max_tokens=rng.randrange(5, 60), temperature=0.0 if seed is None else 1.0, seed=seed,
                                     structured_output=specs[kind], ignore_eos=kind == "free"))
        prompts.append(rng.choice(PROMPTS) + " " * rng.randrange(3))
    single = LLM(tiny_llama_dir, num_kv_blocks=16, max_num_seqs=8, num_scheduler_steps=1)
    want = single.generate(prompts, params)
    llm = LLM(tiny_llama_dir, num_kv_blocks=16, max_num_seqs=8, num_scheduler_steps=4)
    llm.engine.runner.graphs = EagerGraphDecoder(llm.engine.runner, 4)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.runner.graphs.steps_ahead > 0
    for out, p in zip(got, params):
        if p.structured_output is specs["json"] and out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), schema)
    llm.engine.step()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
