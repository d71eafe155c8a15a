"""The engine core in a child process (EngineCoreClient) behind AsyncEngine: same tokens as in one
process, aborts reach the child's block manager, start-up and step failures come back as errors."""

import asyncio
import os
import signal
import threading

import pytest

from engine import AsyncEngine, SamplingParams
from engine.config import EngineConfig
from engine.engine_process import EngineCoreClient, start_engine_core
from engine.errors import EngineDead, EngineError

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _client(model_dir: str) -> EngineCoreClient:
    return EngineCoreClient(EngineConfig(model=model_dir, device="cpu", num_kv_blocks=64, max_num_seqs=8,
                                         max_num_batched_tokens=256))


async def _until(predicate, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_streams_match_one_process_and_aborts_free_blocks(tiny_llama_dir, tiny_llm):
    engine_process = _client(tiny_llama_dir)
    prompts = ["one two three", "the sky is", "four score and seven years ago", "hello"]
    expected = [o.token_ids for o in tiny_llm.generate(prompts, GREEDY)]
    assert engine_process.tokenizer.encode("the sky is") == tiny_llm.tokenizer.encode("the sky is")

    async def main():
        engine = AsyncEngine(engine=engine_process)
        try:
            async def tokens(rid, prompt):
                outs = [o async for o in engine.generate(rid, prompt, GREEDY)]
                assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 24
                return [t for o in outs for t in o.new_token_ids]

            got = await asyncio.gather(*(tokens(f"r{i}", p) for i, p in enumerate(prompts)))
            # Leave a long request after its first delta: the abort must free its blocks in the child.
            long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            stream = engine.add_request("long", "count with me: one two", long)
            first = await stream.__anext__()
            assert first.new_token_ids and not first.finished
            assert engine.stats().kv_cache_usage > 0
            stream.close()
            await _until(lambda: engine.stats().kv_cache_usage == 0.0 and engine.stats().num_running == 0)
            assert engine_process.num_unfinished == 0
            return got
        finally:
            await engine.shutdown()
            assert not engine_process.process.is_alive()

    assert asyncio.run(main()) == expected


def test_startup_error_is_an_engine_error(tmp_path):
    with pytest.raises(EngineError):
        EngineCoreClient(EngineConfig(model=str(tmp_path / "no-such-model"), device="cpu"))


def test_dead_engine_process_fails_requests(tiny_llama_dir):
    client = _client(tiny_llama_dir)

    async def main():
        engine = AsyncEngine(engine=client)
        stream = engine.add_request("a", "one two three", SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
        await stream.__anext__()
        os.kill(client.process.pid, signal.SIGKILL)
        with pytest.raises(EngineDead):
            async for _ in stream:
                pass
        assert engine.dead is not None
        with pytest.raises(EngineDead):
            engine.add_request("b", "hello", GREEDY)
        await engine.shutdown()

    asyncio.run(main())


def test_a_burst_never_blocks_the_event_loop_on_the_pipe(tiny_llama_dir):
    """With the child stopped (SIGSTOP), 400 long prompts (far over a pipe's 64 KiB) must still be
    accepted at once: the event loop never writes to the pipe itself. Writing from the loop once
    deadlocked a server under a 512-request burst (loop blocked on the command pipe, child blocked
    on the result pipe). Once the child resumes, every request completes."""
    client = _client(tiny_llama_dir)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    # A loop blocked in a pipe write cannot run its own timeout: a watchdog thread resumes the
    # child after 20 s (so the test ends instead of hanging) and records that it had to.
    resumed_by_watchdog = threading.Event()

    def watchdog():
        resumed_by_watchdog.set()
        os.kill(client.process.pid, signal.SIGCONT)

    async def main():
        engine = AsyncEngine(engine=client)
        os.kill(client.process.pid, signal.SIGSTOP)
        timer = threading.Timer(20.0, watchdog)
        timer.start()
        streams = [engine.add_request(f"b{i}", [(i + j) % 200 + 3 for j in range(200)], params) for i in range(400)]
        timer.cancel()
        assert not resumed_by_watchdog.is_set(), "add_request blocked on the pipe"
        os.kill(client.process.pid, signal.SIGCONT)

        async def drain(stream):
            return [o async for o in stream][-1]

        finals = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), timeout=120)
        assert all(f.finished and f.num_output_tokens == 2 for f in finals)
        await engine.shutdown()

    asyncio.run(main())


def test_two_clients_share_one_engine_process(tiny_llama_dir, tiny_llm):
    """`--api-server-count`'s plumbing: two clients on one engine process each get exactly their
    own requests' outputs, see the other's waiting requests, and one stopping leaves the other
    served; the engine process exits after the last."""
    config = EngineConfig(model=tiny_llama_dir, device="cpu", num_kv_blocks=64, max_num_seqs=2, max_num_batched_tokens=256)
    handle = start_engine_core(config, num_clients=2)
    first, second = (EngineCoreClient(config, pipes, handle.info) for pipes in handle.pipes)
    prompts = ["one two three", "the sky is", "four score and seven years ago", "hello"]
    expected = [o.token_ids for o in tiny_llm.generate(prompts, GREEDY)]

    async def main():
        a, b = AsyncEngine(engine=first), AsyncEngine(engine=second)

        async def tokens(engine, rid, prompt):
            return [t async for o in engine.generate(rid, prompt, GREEDY) for t in o.new_token_ids]

        got = await asyncio.gather(*(tokens(a if i % 2 else b, f"r{i}", p) for i, p in enumerate(prompts)))
        assert got == expected and first.num_unfinished == 0 and second.num_unfinished == 0

        # Two running slots: of a's five long requests three wait, and b counts them.
        long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
        streams = [a.add_request(f"long{i}", "count with me: one two", long) for i in range(5)]
        await _until(lambda: second.num_waiting == 3 and first.num_waiting == 3)
        for stream in streams:
            stream.close()
        await _until(lambda: b.stats().kv_cache_usage == 0.0 and second.num_waiting == 0)

        stream = b.add_request("after", "count with me: one two", long)
        await a.shutdown()  # a stops; b's request keeps going
        outs = [o async for o in stream]
        assert outs[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in outs) == 60
        assert handle.process.is_alive()
        await b.shutdown()

    asyncio.run(main())
    handle.process.join(10)
    assert handle.process.exitcode == 0


def test_a_client_that_vanishes_has_its_requests_aborted(tiny_llama_dir):
    """An API process that dies without a word (its pipes close) must not leave its requests
    holding KV blocks in the shared engine."""
    config = EngineConfig(model=tiny_llama_dir, device="cpu", num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=256)
    handle = start_engine_core(config, num_clients=2)
    (commands, results), survivor_pipes = handle.pipes
    survivor = EngineCoreClient(config, survivor_pipes, handle.info)
    seq = survivor.make_sequence("doomed", "count with me: one two", SamplingParams(max_tokens=200, ignore_eos=True))

    async def main():
        engine = AsyncEngine(engine=survivor)
        engine._ensure_loop()
        commands.send([("add", seq)])
        await _until(lambda: engine.stats().kv_cache_usage > 0)
        commands.close()
        results.close()
        await _until(lambda: engine.stats().kv_cache_usage == 0.0 and engine.stats().num_running == 0)
        await engine.shutdown()

    asyncio.run(main())
    handle.process.join(10)
    assert handle.process.exitcode == 0


def test_an_engine_process_with_grammar_workers_serves_constrained_requests(tiny_llama_dir, tiny_llm):
    """Grammar workers are the engine process's own children (it is then started non-daemonic):
    constrained outputs match one process's, and shutting down stops the workers too."""
    import json

    from engine.sampling_params import StructuredOutputSpec

    number = {"type": "integer", "minimum": 0, "maximum": 99}
    spec = StructuredOutputSpec.json_schema({"type": "object", "properties": {"n": number}, "required": ["n"],
                                             "additionalProperties": False})
    params = SamplingParams(max_tokens=40, temperature=0.0, structured_output=spec)
    prompts = ["a number please", "another one"]
    expected = [o.token_ids for o in tiny_llm.generate(prompts, params)]
    engine_process = EngineCoreClient(EngineConfig(model=tiny_llama_dir, device="cpu", num_kv_blocks=64, max_num_seqs=8,
                                                   max_num_batched_tokens=256, grammar_workers=1))
    assert not engine_process.process.daemon

    async def main():
        engine = AsyncEngine(engine=engine_process)
        try:
            async def tokens(rid, prompt):
                outs = [o async for o in engine.generate(rid, prompt, params)]
                assert outs[-1].finished and outs[-1].finish_reason == "stop"
                return [t for o in outs for t in o.new_token_ids]

            return await asyncio.gather(*(tokens(f"r{i}", p) for i, p in enumerate(prompts)))
        finally:
            await engine.shutdown()
            assert not engine_process.process.is_alive()

    got = asyncio.run(main())
    assert got == expected
    assert all("n" in json.loads(tiny_llm.tokenizer.decode(t)) for t in got)
