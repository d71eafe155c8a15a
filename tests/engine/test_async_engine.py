"""The asyncio engine streams deltas, interleaves requests and frees blocks on abort."""

import asyncio

import pytest

from engine import AsyncEngine, EngineOverloaded, InvalidRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture()
def async_engine(tiny_llm):
    engine = AsyncEngine(engine=tiny_llm.engine)
    yield engine
    asyncio.run(engine.shutdown())


async def collect(engine, rid, prompt, params=GREEDY):
    outs = [o async for o in engine.generate(rid, prompt, params)]
    return outs


def test_streams_match_offline_generate(tiny_llm, async_engine):
    prompts = ["one two three", "the sky is", "four score and seven years ago"]
    expected = [o.token_ids for o in tiny_llm.generate(prompts, GREEDY)]

    async def main():
        return await asyncio.gather(*(collect(async_engine, f"s{i}", p) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    for outs, exp in zip(results, expected):
        assert [t for o in outs for t in o.new_token_ids] == exp
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert all(not o.finished for o in outs[:-1])
        assert outs[-1].num_output_tokens == 16 and outs[-1].first_token_time_s is not None
    assert async_engine.engine.block_manager.num_used_blocks == 0


def test_steps_run_back_to_back_on_the_step_thread_until_a_command_waits(tiny_llm, async_engine):
    """While nobody joins or leaves, the step thread steps on without handing back to the event loop
    (each step's outputs still reach the streams in order); a request added meanwhile ends that
    streak after the step in flight, and joins."""
    steps, starts = [], []
    engine_step, start_step = tiny_llm.engine.step, async_engine._start_step
    tiny_llm.engine.step = lambda: steps.append(1) or engine_step()
    async_engine._start_step = lambda loop: starts.append(1) or start_step(loop)
    (expected,) = tiny_llm.generate(["back to back"], GREEDY)
    (late,) = tiny_llm.generate(["late comer"], GREEDY)
    steps.clear()

    async def main():
        first = asyncio.create_task(collect(async_engine, "a", "back to back"))
        while len(steps) < 4:
            await asyncio.sleep(0.001)
        second = await collect(async_engine, "b", "late comer")
        return await first, second, len(starts)

    try:
        first, second, starts_then = asyncio.run(main())
    finally:
        tiny_llm.engine.step = engine_step
    assert [t for o in first for t in o.new_token_ids] == expected.token_ids
    assert [t for o in second for t in o.new_token_ids] == late.token_ids
    assert len(steps) >= 16 and starts_then <= 3, (len(steps), starts_then)


def test_shutdown_ends_the_step_threads_streak(tiny_llm):
    """Shutting down mid-generation stops stepping after the step in flight; it does not wait
    for the requests to finish."""
    engine = AsyncEngine(engine=tiny_llm.engine)
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        stream = engine.add_request("long", "a long one", long)
        await stream.__anext__()
        await engine.shutdown()

    asyncio.run(main())
    assert "long" in tiny_llm.engine.requests, "shutdown waited for the request to finish"
    made = len(tiny_llm.engine.requests["long"].seq.output_token_ids)
    tiny_llm.engine.abort_request("long")
    assert made < 100, made


def test_abort_and_early_exit_free_blocks(async_engine):
    engine = async_engine.engine
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        # A consumer that walks away after 3 deltas (as a disconnecting client does).
        gen = async_engine.generate("leaver", "walk away", long)
        n = 0
        async for _ in gen:
            n += 1
            if n == 3:
                break
        await gen.aclose()

        # An explicit abort from another task.
        async def consume():
            return [o async for o in async_engine.generate("victim", "abort me", long)]

        task = asyncio.create_task(consume())
        while "victim" not in engine.requests or not engine.requests["victim"].seq.output_token_ids:
            await asyncio.sleep(0)
        async_engine.abort("victim")
        outs = await task
        assert outs[-1].finish_reason == "abort"
        # Let the loop apply any abort deferred behind a running step.
        for _ in range(50):
            if not engine.requests:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert not engine.requests
    assert engine.block_manager.num_used_blocks == 0


def test_bad_request_raises_before_streaming(async_engine):
    async def main():
        with pytest.raises(InvalidRequest):
            await collect(async_engine, "bad", "")
        return await collect(async_engine, "good", "still alive")

    assert asyncio.run(main())[-1].finished


def test_max_waiting_rejects_excess(tiny_llm):
    engine = AsyncEngine(engine=tiny_llm.engine, max_waiting=0)

    async def main():
        with pytest.raises(EngineOverloaded):
            await collect(engine, "x", "hello")

    asyncio.run(main())
    asyncio.run(engine.shutdown())


def test_a_slow_consumer_gets_merged_deltas_with_everything(tiny_llm, async_engine):
    """Deltas queued while the consumer is busy come out as one: same tokens, text and logprobs."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    (expected,) = tiny_llm.generate(["a slow reader"], params)

    async def main():
        done = asyncio.Event()  # listeners run after the step's outputs are queued
        async_engine.step_listeners.append(lambda _, outs: done.set() if any(o.finished for o in outs) else None)
        stream = async_engine.add_request("slow", "a slow reader", params)
        outs = []
        async for out in stream:
            outs.append(out)
            if len(outs) == 1:
                await done.wait()  # stay away until the engine is done: everything queues up
        async_engine.step_listeners.pop()
        return outs

    outs = asyncio.run(main())
    assert len(outs) == 2, "the queued deltas should arrive merged into one"
    assert [t for o in outs for t in o.new_token_ids] == expected.token_ids
    assert "".join(o.new_text for o in outs) == expected.text
    assert [lp.token_id for o in outs for lp in o.new_logprobs] == expected.token_ids
    assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 24


def test_an_in_process_engine_shortens_the_gil_switch_interval(tiny_llm):
    """The step thread must get the GIL back soon after each wait: with an in-process engine the
    interval drops to STEP_THREAD_SWITCH_INTERVAL_S (from Python's 5 ms), and is never raised."""
    import sys

    from engine.async_engine import STEP_THREAD_SWITCH_INTERVAL_S

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        AsyncEngine(engine=tiny_llm.engine)
        assert sys.getswitchinterval() == pytest.approx(STEP_THREAD_SWITCH_INTERVAL_S)
        sys.setswitchinterval(1e-4)
        AsyncEngine(engine=tiny_llm.engine)
        assert sys.getswitchinterval() == pytest.approx(1e-4, rel=0.05)  # stored in whole microseconds
    finally:
        sys.setswitchinterval(before)
