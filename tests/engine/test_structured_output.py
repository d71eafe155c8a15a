"""Constrained decoding in the engine (xgrammar masks applied by the sampler), and the tool-call
formats: prompts, constraints, parsing whole and streamed outputs."""

from __future__ import annotations

import json
import os
import random
import re

import jsonschema
import pytest
import torch

from engine import SamplingParams
from engine.errors import InvalidRequest
from engine.sampling_params import StructuredOutputSpec
from engine.grammar_workers import GrammarWorkers, SpawnedWorkers
from engine.structured_output import FillThreads, GrammarSteps, StructuredOutputs
from engine import tool_calls

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 5},
                                                  "minItems": 1, "maxItems": 3}},
        "required": ["id", "tags"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"anyOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["kind", "x"], "additionalProperties": False},
               {"type": "object", "properties": {"kind": {"const": "b"}}, "required": ["kind"], "additionalProperties": False}]},
]


def constrained(spec: StructuredOutputSpec, seed: int | None = None, max_tokens: int = 120, **kw) -> SamplingParams:
    temperature = 0.0 if seed is None else 1.0
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, structured_output=spec, **kw)


def test_every_schema_and_seed_gives_valid_json_beside_free_requests(tiny_llm):
    """Random weights: only the mask makes these valid. Constrained and free rows share steps."""
    prompts, params = [], []
    for i, schema in enumerate(SCHEMAS):
        for seed in (None, 1, 2, 3):
            prompts.append(f"Request {i}: JSON please")
            params.append(constrained(StructuredOutputSpec.json_schema(schema), seed))
    prompts += ["free text one", "free text two"]
    params += [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)] * 2
    outs = tiny_llm.generate(prompts, params)
    for out, p in zip(outs[:-2], params[:-2]):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), json.loads(p.structured_output.value))
    assert all(len(o.token_ids) == 20 for o in outs[-2:])
    bm = tiny_llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not tiny_llm.engine._compiling


def test_regex_choice_grammar_and_json_object(tiny_llm):
    specs = [StructuredOutputSpec("regex", r"[0-9]{3}-[a-z]{2}"), StructuredOutputSpec.choice(["yes", "no", "maybe"]),
             StructuredOutputSpec("grammar", 'root ::= "(" [0-9] [0-9]? ")"'), StructuredOutputSpec("json_object")]
    outs = tiny_llm.generate(["a", "b", "c", "d"], [constrained(s, seed=5, max_tokens=60) for s in specs])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[0].text)
    assert outs[1].text in ("yes", "no", "maybe")
    assert re.fullmatch(r"\([0-9]{1,2}\)", outs[2].text)
    assert all(o.finish_reason == "stop" for o in outs[:3])
    # Any object: a random model may not close it in 60 tokens, but it is one from the first byte.
    assert outs[3].text.startswith("{") and (outs[3].finish_reason == "length" or isinstance(json.loads(outs[3].text), dict))


def test_bad_specs_are_invalid_requests(tiny_llm):
    structured = tiny_llm.engine.structured
    for spec in (StructuredOutputSpec("regex", "(unclosed"), StructuredOutputSpec("json_schema", '{"type": "nonsense"}'),
                 StructuredOutputSpec("grammar", "root ::= undefined_rule")):
        with pytest.raises(InvalidRequest) as err:
            structured.validate(spec)
        assert "/" not in err.value.message.split(":")[0]  # no C++ source path in the message
    with pytest.raises(InvalidRequest):
        StructuredOutputSpec.json_schema("{not json")


def test_a_bad_spec_reaching_the_engine_aborts_only_its_request(tiny_llm):
    engine = tiny_llm.engine
    engine.add_request("bad", "x", constrained(StructuredOutputSpec("regex", "(")))
    engine.add_request("good", "y", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["bad"].finish_reason == "abort" and "regex" in finished["bad"].stop_reason
    assert finished["good"].finish_reason == "length"


def test_abort_while_compiling_and_after(tiny_llm):
    engine = tiny_llm.engine
    spec = StructuredOutputSpec.json_schema({"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"]})
    engine.add_request("early", "x", constrained(spec))
    assert engine.abort_request("early") and not engine._compiling and not engine.has_unfinished()
    engine.add_request("late", "x", constrained(spec))
    engine.step()
    engine.step()
    assert engine.abort_request("late")
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.requests


def test_grammar_cache_is_bounded_and_keeps_the_recently_used(tiny_llm):
    """Specs of equal compiled size, room for three: a fourth evicts the least recently used."""
    engine = tiny_llm.engine
    outputs = StructuredOutputs.for_tokenizer(engine.tokenizer, engine.model_config.vocab_size, (50256,))
    specs = [StructuredOutputSpec("regex", f"{c}[0-9]{{3}}") for c in "abcde"]
    futures = [outputs.compile_async(spec) for spec in specs[:3]]
    size = futures[0].result().memory_size_bytes
    assert all(f.result().memory_size_bytes == size for f in futures)
    outputs.cache_limit_bytes = 3 * size
    assert outputs.compile_async(specs[0]) is futures[0]  # a hit: now the most recently used
    outputs.compile_async(specs[3]).result()  # evicts specs[1]
    outputs.compile_async(specs[4]).result()  # evicts specs[2]
    assert outputs.compile_async(specs[0]) is futures[0]
    again = outputs.compile_async(specs[1])
    assert again is not futures[1]  # compiled again
    again.result()  # evicts specs[3]
    assert list(outputs._cache) == [specs[4], specs[0], specs[1]]
    assert sum(outputs._sizes.values()) <= outputs.cache_limit_bytes
    with pytest.raises(InvalidRequest):  # a bad spec fails and is not kept
        outputs.validate(StructuredOutputSpec("regex", "(unclosed"))
    assert list(outputs._cache) == [specs[4], specs[0], specs[1]]


def test_fill_threads_takes_the_cheaper_and_probes_the_other(tiny_llm):
    """One thread and several fill the same bits; after measuring both, the cheaper one runs, and
    every probe_every-th fill the other, so a change in the rows' cost is noticed."""
    import torch
    import xgrammar as xgr

    engine = tiny_llm.engine
    outputs = StructuredOutputs.for_tokenizer(engine.tokenizer, engine.model_config.vocab_size, (50256,))
    compiled = outputs.compile_async(StructuredOutputSpec.json_schema(SCHEMAS[0])).result()
    matchers = [outputs.matcher(compiled) for _ in range(4)]
    for m, text in zip(matchers, ['{"name": "', '{"na', '', '{"name": "ab", "age": 1']):
        assert m.accept_string(text)
    fill = FillThreads(2, probe_every=4)
    words = (engine.model_config.vocab_size + 31) // 32
    masks = []
    for _ in range(2):  # each choice runs once first
        mask = torch.zeros(4, words, dtype=torch.int32)
        fill(matchers, mask)
        masks.append(mask)
    assert sorted(fill.seconds) == [1, 2] and torch.equal(masks[0], masks[1])
    one_by_one = torch.zeros(4, words, dtype=torch.int32)
    for i, m in enumerate(matchers):
        m.fill_next_token_bitmask(one_by_one, i)
    assert torch.equal(masks[0], one_by_one)
    assert len(fill._slices) == 2 and all(isinstance(m, xgr.BatchGrammarMatcher) for m in fill._slices)
    fill.seconds = {1: 1e-3, 2: 5e-3}
    fill.calls = 0
    assert [fill.pick() for _ in range(8)] == [1, 1, 1, 2, 1, 1, 1, 2]
    fill.seconds = {1: 9e-3, 2: 5e-3}
    assert fill.pick() == 2
    # More threads: 1, 2, 4 and 8 are each measured once, then the cheapest runs and each probe
    # takes the choice measured longest ago.
    wide = FillThreads(8, probe_every=4)
    assert wide.choices == [1, 2, 4, 8]
    cost = {1: 3e-3, 2: 1e-3, 4: 2e-3, 8: 4e-3}
    first = []
    for _ in range(4):
        first.append(wide.pick())
        wide.seconds[first[-1]] = cost[first[-1]]  # as __call__ records it
    assert first == [1, 2, 4, 8]
    assert [wide.pick() for _ in range(12)] == [2, 2, 2, 1, 2, 2, 2, 4, 2, 2, 2, 8]


def test_grammar_steps_end_rows_on_their_stop_token_or_a_rejection(tiny_llm):
    """A run's rows leave its grammar when their matcher takes the stop token (only then: the
    matcher's end is checked for stop tokens alone) or rejects a token; `ends` is the step count
    they keep. Free rows (None) stay free, and a row that has matched its grammar but not taken the stop token stays."""
    engine = tiny_llm.engine
    tok = engine.tokenizer
    stop = 50256
    outputs = StructuredOutputs.for_tokenizer(tok, engine.model_config.vocab_size, (stop,))
    compiled = outputs.compile_async(StructuredOutputSpec.choice(["yes", "no"])).result()
    done, rejects, no_then_stop = (outputs.matcher(compiled) for _ in range(3))
    steps = GrammarSteps(outputs, [done, None, rejects, no_then_stop])
    yes, no = tok.encode("yes"), tok.encode("no")
    assert len(yes) == 1 and len(no) == 1
    steps.accept([yes[0], 7, no[0], no[0]])
    assert steps.ends == {} and not done.is_terminated()
    steps.accept([stop, 7, yes[0], stop])  # "noyes" is no choice
    assert steps.ends == {0: 2, 2: 2, 3: 2}
    assert steps._matchers == [None, None, None, None] and done.is_terminated() and no_then_stop.is_terminated()
    steps = GrammarSteps(outputs, [outputs.matcher(compiled)])
    steps.accept(yes)  # complete, but it has not taken the stop token: it stays
    assert steps.ends == {} and steps._matchers[0] is not None


def test_seeded_constrained_sampling_is_reproducible(tiny_llm):
    spec = StructuredOutputSpec.json_schema(SCHEMAS[2])
    a = tiny_llm.generate(["p"], constrained(spec, seed=7))[0].text
    b = tiny_llm.generate(["p", "q"], [constrained(spec, seed=7), constrained(spec, seed=8)])[0].text
    assert a == b


# ---- tool calls ------------------------------------------------------------------------------
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}}},
]


def replay(stream: tool_calls.ToolCallStream, text: str, rng: random.Random) -> tuple[str, list[dict]]:
    """Feed `text` in random pieces; assemble the deltas as an OpenAI client does."""
    deltas, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        deltas += stream.feed(text[i:i + n])
        i += n
    deltas += stream.finish()
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in tc:
                assert call["id"] is None, "id, type and name come once per call"
                call["id"], call["name"] = tc["id"], tc["function"]["name"]
                assert tc["type"] == "function"
            call["arguments"] += tc["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)]


def test_required_tool_choice_always_yields_valid_calls(tiny_llm):
    mode, named = tool_calls.resolve_mode(TOOLS, "required")
    spec = tool_calls.constraint(mode, TOOLS, named, parallel=False)
    outs = tiny_llm.generate(["call a tool"] * 4, [constrained(spec, seed=s, max_tokens=200) for s in range(4)])
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed, out in enumerate(outs):
        content, calls = tool_calls.parse(out.text, mode, TOOLS, named)
        assert out.finish_reason == "stop" and content is None and len(calls) == 1
        jsonschema.validate(json.loads(calls[0].arguments), schemas[calls[0].name])
        streamed_content, streamed = replay(tool_calls.ToolCallStream(mode, TOOLS, named), out.text, random.Random(seed))
        assert streamed_content == "" and [(c["name"], json.loads(c["arguments"])) for c in streamed] == \
            [(c.name, json.loads(c.arguments)) for c in calls]


def test_parallel_required_calls_stream_as_they_complete(tiny_llm):
    """Parallel calls: a random model rarely closes the array, so check what completes: every call
    the stream finished is valid, in order, and a finished output parses whole."""
    mode, named = tool_calls.resolve_mode(TOOLS, "required")
    spec = tool_calls.constraint(mode, TOOLS, named, parallel=True)
    outs = tiny_llm.generate(["call tools"] * 3, [constrained(spec, seed=s, max_tokens=150) for s in range(3)])
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed, out in enumerate(outs):
        _, streamed = replay(tool_calls.ToolCallStream(mode, TOOLS, named), out.text, random.Random(seed))
        complete = streamed if out.finish_reason == "stop" else streamed[:-1]
        assert len(streamed) >= 1 and (out.finish_reason == "stop" or len(streamed) >= 2)
        for call in complete:
            jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
        if out.finish_reason == "stop":
            assert [c.name for c in tool_calls.parse(out.text, mode, TOOLS, named)[1]] == [c["name"] for c in streamed]


def test_named_tool_choice_constrains_to_its_arguments(tiny_llm):
    mode, named = tool_calls.resolve_mode(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert mode == "named" and named is TOOLS[1]
    spec = tool_calls.constraint(mode, TOOLS, named, True)
    out = tiny_llm.generate(["add"], constrained(spec, seed=3))[0]
    _, calls = tool_calls.parse(out.text, mode, TOOLS, named)
    assert [c.name for c in calls] == ["add"]
    jsonschema.validate(json.loads(calls[0].arguments), TOOLS[1]["function"]["parameters"])
    _, streamed = replay(tool_calls.ToolCallStream(mode, TOOLS, named), out.text, random.Random(0))
    assert streamed[0]["name"] == "add" and streamed[0]["arguments"] == out.text


def test_auto_mode_parses_hermes_blocks_and_llama_json():
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' \
           '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    content, calls = tool_calls.parse(text, "auto", TOOLS, None)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[1].arguments) == {"a": 1, "b": 2} and calls[0].id != calls[1].id
    streamed_content, streamed = replay(tool_calls.ToolCallStream("auto", TOOLS, None), text, random.Random(1))
    assert streamed_content.strip() == "Let me check." and [c["name"] for c in streamed] == ["get_weather", "add"]
    assert tool_calls.parse('{"name": "add", "parameters": {"a": 5, "b": 6}}', "auto", TOOLS, None)[1][0].arguments \
        == '{"a": 5, "b": 6}'
    # Unknown names, broken JSON and lookalike text stay content.
    for plain in ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "<tool_call>{oops</tool_call>",
                  "I like <tool_calls> and < tool_call >"):
        assert tool_calls.parse(plain, "auto", TOOLS, None) == (plain, [])
        assert replay(tool_calls.ToolCallStream("auto", TOOLS, None), plain, random.Random(2)) == (plain, [])


def test_tool_history_renders_for_templates_without_tools():
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]
    out = tool_calls.template_messages(messages, TOOLS, template_takes_tools=False)
    assert out[0]["role"] == "system" and "<tools>" in out[0]["content"] and "get_weather" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert out[3] == {"role": "tool", "content": "-3 C"}
    native = tool_calls.template_messages(messages, TOOLS, template_takes_tools=True)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"} and len(native) == 3


def test_tool_choice_errors():
    with pytest.raises(InvalidRequest):
        tool_calls.resolve_mode(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidRequest):
        tool_calls.resolve_mode(None, "required")
    assert tool_calls.resolve_mode(None, None) == ("none", None) and tool_calls.resolve_mode(TOOLS, None) == ("auto", None)


def test_grammar_workers_fill_and_end_rows_as_the_engine_process_does(tiny_llm):
    """Matchers held in worker processes (engine.grammar_workers): the same bitmask rows and the
    same row ends, step for step, as matchers in this process, for rows spread over two workers,
    free rows between them, a rejection and a stop token; a released matcher leaves its worker."""
    engine = tiny_llm.engine
    tok, vocab, stop = engine.tokenizer, engine.model_config.vocab_size, 50256
    here = StructuredOutputs.for_tokenizer(tok, vocab, (stop,))
    there = StructuredOutputs.for_tokenizer(tok, vocab, (stop,))
    GrammarWorkers.start(there, 2, max_rows=8)
    try:
        specs = [StructuredOutputSpec.json_schema(SCHEMAS[0]), None, StructuredOutputSpec.json_schema(SCHEMAS[3]),
                 StructuredOutputSpec.choice(["yes", "no"]), StructuredOutputSpec.json_schema(SCHEMAS[2])]

        def matchers(outputs, remote):
            return [None if s is None else outputs.matcher(outputs.compile_async(s).result(), s if remote else None)
                    for s in specs]

        ours, theirs = matchers(here, False), matchers(there, True)
        assert sorted(there.workers._load) == [2, 2]
        steps_here, steps_there = GrammarSteps(here, ours), GrammarSteps(there, theirs)
        assert torch.equal(steps_here.fill(), steps_there.fill())
        rng = random.Random(0)
        yes = tok.encode("yes")[0]
        for step in range(12):
            mask = steps_here.fill().clone() if step == 0 else mask
            # each row's next token: an allowed one (the lowest, or a random one), except row 3,
            # which takes "yes", then a token its grammar rejects
            ids = torch.arange(vocab)
            tokens = []
            for row in range(len(specs)):
                allowed = ids[(mask[row, ids // 32] >> (ids % 32)) & 1 == 1].tolist()
                tokens.append(min(allowed) if row % 2 else rng.choice(allowed))
            tokens[3] = yes if step == 0 else tokens[0]
            mask = steps_here.fill(tokens).clone()
            assert torch.equal(mask, steps_there.fill(tokens)), step
            assert steps_here.ends == steps_there.ends, step
        assert 3 in steps_there.ends and steps_there.ends[3] == 2  # rejected at its second token
        for m in theirs:
            if m is not None:
                there.release(m)
        assert there.workers._load == [0, 0]
    finally:
        there.close()
    assert there.workers is None


def test_grammar_workers_start_without_waiting_for_each_other(tiny_llm, monkeypatch):
    """A worker's spawn arguments stay small, so that starting it returns at once and the workers
    import in parallel: the vocabulary (a megabyte for a 128k one) goes through shared memory, read
    back byte for byte (empty, multi-byte and special tokens included). Pickled into the spawn pipe
    it made each start wait for that child's imports (16 s for 4 workers on the H200 host). Workers
    spawned ahead and then not needed stop; set-up ones report ready."""
    import multiprocessing.context
    import pickle

    from engine import grammar_workers

    table = [b"", b"a", "\u00e9".encode(), b"\xff\xfe", b"<|endoftext|>", b" the"] * 3
    shm = grammar_workers._share_token_bytes(table)
    try:
        assert grammar_workers._read_token_bytes(shm.name, len(table)) == table
    finally:
        shm.close()
        shm.unlink()
    engine = tiny_llm.engine
    outputs = StructuredOutputs.for_tokenizer(engine.tokenizer, engine.model_config.vocab_size, (50256,))
    assert len(pickle.dumps(outputs.token_bytes)) > 64 * 1024  # GPT-2's would fill a pipe's buffer
    arg_bytes = []
    start = multiprocessing.context.SpawnProcess.start

    def measured_start(proc):  # (start drops the arguments once sent)
        arg_bytes.append(len(pickle.dumps(proc._args)))
        start(proc)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", measured_start)
    spawned = SpawnedWorkers.ahead(2)  # as the engine does, before it captures its graphs
    assert GrammarWorkers.start(StructuredOutputs(None, 100, (0,)), spawned, 4) is None  # no grammar to run:
    for proc in spawned.procs:  # the processes spawned ahead stop, never set up
        assert not proc.is_alive()
    GrammarWorkers.start(outputs, 2, max_rows=8).wait_ready()
    try:
        assert len(arg_bytes) == 4 and max(arg_bytes) < 4096
        assert [int(outputs.workers._ctl.ctl[w, outputs.workers._ctl.READY]) for w in range(2)] == [1, 1]
        matcher = outputs.matcher(outputs.compile_async(StructuredOutputSpec.choice(["yes"])).result(),
                                  StructuredOutputSpec.choice(["yes"]))
        mask, ends = outputs.workers.step([matcher], None, fill=True)
        allowed = [t for t in range(engine.model_config.vocab_size) if (int(mask[0, t // 32]) >> (t % 32)) & 1]
        assert allowed and all(b"yes".startswith(outputs.token_bytes[t]) and outputs.token_bytes[t] for t in allowed)
    finally:
        outputs.close()


def test_constrained_requests_through_grammar_workers_match_the_engine_process(tiny_llama_dir, tiny_llm, monkeypatch):
    """An engine whose matchers live in two worker processes gives the same constrained outputs,
    greedy and seeded, beside free requests (single steps and multi-step runs alike), as one
    that keeps them in its own process."""
    import inspect

    from engine import LLM

    prompts = [f"Request {i}: JSON please" for i in range(len(SCHEMAS))] + ["free text"]
    params = [constrained(StructuredOutputSpec.json_schema(s), seed=None if i % 2 else i) for i, s in enumerate(SCHEMAS)]
    params.append(SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    want = tiny_llm.generate(prompts, params)
    spawned_in = []
    ahead = SpawnedWorkers.ahead.__func__

    def recorded(cls, workers):  # where the engine spawns its workers
        spawned_in.append([frame.function for frame in inspect.stack()[1:4]])
        return ahead(cls, workers)

    monkeypatch.setattr(SpawnedWorkers, "ahead", classmethod(recorded))
    with LLM(tiny_llama_dir, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=256, grammar_workers=2) as llm:
        got = llm.generate(prompts, params)
        assert llm.engine.structured.workers._load == [0, 0]  # every finished request's matcher released
    # once, from the runner, once a cold start's compile pool is done and before the graphs are captured
    assert len(spawned_in) == 1 and "_build" in spawned_in[0]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for out, p in zip(got[:-1], params[:-1]):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), json.loads(p.structured_output.value))


def test_a_request_leaves_its_grammar_worker_however_it_ends(tiny_llama_dir):
    """A constrained request's matcher is on its worker from arrival: finished, aborted while its
    grammar compiles, or failed to compile, the request leaves no matcher behind there."""
    from engine import LLM

    with LLM(tiny_llama_dir, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=256, grammar_workers=1) as llm:
        engine = llm.engine
        load = engine.structured.workers._load
        engine.add_request("aborted", "JSON please", constrained(StructuredOutputSpec.json_schema(SCHEMAS[1])))
        assert load == [1]
        assert engine.abort_request("aborted") and load == [0]
        bad = StructuredOutputSpec("regex", "(unclosed")  # (the API would have refused it)
        engine.add_request("bad", "x", constrained(bad))
        engine.add_request("done", "JSON please", constrained(StructuredOutputSpec.choice(["yes", "no"])))
        finished = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.finish_reason
        assert finished == {"bad": "abort", "done": "stop"} and load == [0]


def test_a_sleeping_grammar_worker_wakes_and_a_dead_one_fails_the_step(tiny_llm):
    """A worker idle past its spin blocks on its pipe and the next step wakes it; a step posted
    to a worker that has died raises instead of waiting forever."""
    import time

    engine = tiny_llm.engine
    outputs = StructuredOutputs.for_tokenizer(engine.tokenizer, engine.model_config.vocab_size, (50256,))
    workers = GrammarWorkers.start(outputs, 1, max_rows=4)
    try:
        spec = StructuredOutputSpec.choice(["yes", "no"])
        matcher = outputs.matcher(outputs.compile_async(spec).result(), spec)
        first, _ = workers.step([matcher], None, fill=True)
        first = first.clone()
        time.sleep(0.2)  # past SPIN_S: asleep on the pipe
        assert workers._ctl.ctl[0, workers._ctl.SLEEPING] == 1
        again, statuses = workers.step([matcher, None], None, fill=True)
        assert torch.equal(again[0], first[0]) and bool((again[1] == -1).all()) and statuses == [0, 0]
        workers._procs[0].kill()
        workers._procs[0].join()
        with pytest.raises(RuntimeError, match="died"):
            workers.step([matcher], None, fill=True)
    finally:
        outputs.close()


def test_grammar_workers_start_from_a_script_without_a_main_guard(tmp_path):
    """A user's script that starts an engine's grammar workers at its top level (no `if __name__
    == "__main__"`) runs once: the spawned workers do not import it again (roseinfer_kernels.precompile.
    spawn_without_main), and the step works."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "unguarded.py"
    script.write_text(
        "print('top level', flush=True)\n"
        "from engine.grammar_workers import GrammarWorkers\n"
        "from engine.sampling_params import StructuredOutputSpec\n"
        "from engine.structured_output import StructuredOutputs\n"
        "from engine.tokenizer import gpt2_tokenizer\n"
        "outputs = StructuredOutputs.for_tokenizer(gpt2_tokenizer(), 50257, (50256,))\n"
        "GrammarWorkers.start(outputs, 1, 4)\n"
        "spec = StructuredOutputSpec.choice(['yes', 'no'])\n"
        "matcher = outputs.matcher(outputs.compile_async(spec).result(), spec)\n"
        "print('statuses', outputs.workers.step([matcher], None, fill=True)[1], flush=True)\n"
        "outputs.close()\n")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("top level") == 1 and "statuses [0]" in done.stdout, done.stdout


@pytest.mark.parametrize("device, cpus, workers", [("cuda", 16, 4), ("cuda", 64, 4), ("cuda", 8, 2), ("cuda", 4, 0),
                                                   ("cpu", 64, 0)])
def test_default_grammar_workers_follow_the_host(device, cpus, workers):
    from engine.grammar_workers import default_grammar_workers

    assert default_grammar_workers(device, cpus) == workers


def test_grammar_workers_unpin_their_bitmask_when_collected(monkeypatch, tiny_llm):
    """The shared bitmask's page-locking (cudaHostRegister, faked here) is undone when the workers
    are collected without close(), before their memory is unmapped: CUDA would otherwise keep the
    range registered and the next engine's segment, often mapped at the same address, could not be
    pinned (the H200 run of the CUDA constrained tests failed that way). The CUDA test
    test_grammar_workers_pin_their_bitmask_engine_after_engine checks it against the real driver."""
    import gc
    from types import SimpleNamespace

    calls = []
    fake = SimpleNamespace(cudaHostRegister=lambda ptr, size, flags: calls.append(("register", ptr)) or 0,
                           cudaHostUnregister=lambda ptr: calls.append(("unregister", ptr)) or 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    engine = tiny_llm.engine
    outputs = StructuredOutputs.for_tokenizer(engine.tokenizer, engine.model_config.vocab_size, (50256,),
                                              pin_bitmask=True)
    workers = GrammarWorkers.start(outputs, 1, max_rows=4)
    ptr = workers.bitmask.data_ptr()
    assert calls == [("register", ptr)] and workers._pinned == [ptr]
    del workers, outputs
    gc.collect()
    assert calls == [("register", ptr), ("unregister", ptr)]


def test_a_grammar_compiling_on_a_worker_does_not_hold_up_its_other_rows(tiny_llm):
    """A request's matcher goes to a worker as the request arrives (StructuredOutputs.reserve), and
    the worker compiles its grammar on a thread of its own: steps of the rows that worker already
    serves go on meanwhile, and once compiled the new row masks as a matcher in this process does."""
    import time

    engine = tiny_llm.engine
    tok, vocab = engine.tokenizer, engine.model_config.vocab_size
    outputs = StructuredOutputs.for_tokenizer(tok, vocab, (50256,))
    here = StructuredOutputs.for_tokenizer(tok, vocab, (50256,))
    fields = 1500  # a schema xgrammar takes about a second to compile
    slow = StructuredOutputSpec.json_schema({"type": "object", "required": [f"f{i}" for i in range(0, fields, 2)],
                                             "properties": {f"f{i}": {"type": ["string", "integer", "null", "boolean"]}
                                                            for i in range(fields)}})
    started = time.perf_counter()
    here_slow = here.compile_async(slow).result()
    compile_s = time.perf_counter() - started
    workers = GrammarWorkers.start(outputs, 1, max_rows=4)
    try:
        choice = StructuredOutputSpec.choice(["yes", "no"])
        serving = outputs.matcher(outputs.compile_async(choice).result(), choice)
        workers.step([serving], None, fill=True)  # the worker is up and holds a row
        new = outputs.reserve(slow)  # a request arrives: its worker starts compiling
        time.sleep(0.05)
        started = time.perf_counter()
        for _ in range(5):
            workers.step([serving], None, fill=True)
        assert time.perf_counter() - started < compile_s / 3  # not behind the compile
        mask, statuses = workers.step([serving, new], None, fill=True)  # (waits for the compile)
        want = here.fill_bitmask([here.matcher(here.compile_async(choice).result()), here.matcher(here_slow)])
        assert statuses == [0, 0] and torch.equal(mask, want)
    finally:
        outputs.close()