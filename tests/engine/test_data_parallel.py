"""Data parallel: two engine-core processes behind one AsyncEngine (CPU). Concurrent requests give
one process's tokens and spread over both cores; a repeated prefix goes back to the core that
holds it; a core that dies fails only its own requests, and the other keeps serving."""

import asyncio
import os
import signal

import pytest

from engine import AsyncEngine, SamplingParams
from engine.config import EngineConfig
from engine.data_parallel import DataParallelClient, engine_client, links_of, start_engine_cores
from engine.errors import EngineDead

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture()
def dp_engine(tiny_llama_dir):
    config = EngineConfig(model=tiny_llama_dir, device="cpu", num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=256)
    handles = start_engine_cores(config, 2)
    client = engine_client(config, links_of(handles), owned=handles)
    assert isinstance(client, DataParallelClient)
    return client, handles


async def collect(engine: AsyncEngine, rid: str, prompt, params=GREEDY) -> list[int]:
    return [t async for out in engine.generate(rid, prompt, params) for t in out.new_token_ids]


def test_concurrent_requests_spread_and_match_one_process(dp_engine, tiny_llm):
    client, _ = dp_engine
    prompts = [f"request number {i} says" for i in range(8)]
    expected = [o.token_ids for o in tiny_llm.generate(prompts, GREEDY)]

    async def main():
        engine = AsyncEngine(engine=client)
        try:
            got = await asyncio.gather(*(collect(engine, f"r{i}", p) for i, p in enumerate(prompts)))
            stats = engine.stats()
            assert stats.num_running == 0 and stats.kv_cache_usage == 0.0  # summed over both cores
            return got
        finally:
            await engine.shutdown()

    assert asyncio.run(main()) == expected
    assert client.routed[0] > 0 and client.routed[1] > 0
    assert all(not h.process.is_alive() for h in client.owned)


def test_a_shared_prefix_goes_back_to_its_core(dp_engine):
    client, _ = dp_engine
    prefix = list(range(100, 164))  # four whole blocks

    async def main():
        engine = AsyncEngine(engine=client)
        try:
            await collect(engine, "first", prefix + [7, 8])
            owner = client.routed.index(1)
            await collect(engine, "other", list(range(300, 340)))  # no shared prefix: the core sent fewer
            assert client.routed == [1, 1]
            for i in range(3):
                await collect(engine, f"again{i}", prefix + [9, i])
                assert client.routed[owner] == 2 + i, "a request with the prefix went elsewhere"
            return owner
        finally:
            await engine.shutdown()

    asyncio.run(main())
    assert client.cores[0].last_step.prefix_cache_hits + client.cores[1].last_step.prefix_cache_hits >= 3 * 64


def test_a_dead_core_fails_only_its_requests(dp_engine):
    client, handles = dp_engine
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        engine = AsyncEngine(engine=client)
        try:
            streams = [engine.add_request(f"long{i}", f"tell me a long story {i}", long) for i in range(2)]
            assert sorted(client.requests.values()) == [0, 1]
            firsts = [await s.__anext__() for s in streams]
            assert all(f.new_token_ids for f in firsts)
            victim = client.requests["long1"]
            os.kill(handles[victim].process.pid, signal.SIGKILL)
            with pytest.raises(EngineDead, match=f"engine core {victim} died"):
                async for _ in streams[1]:
                    pass
            streams[0].close()
            assert client.dead_cores and str(victim) in client.health()["dead_cores"]
            assert engine.dead is None
            return await collect(engine, "after", "still serving")  # the other core answers
        finally:
            await engine.shutdown()

    assert len(asyncio.run(main())) == 12


@pytest.mark.parametrize("gpus, cpus, size, workers", [(True, 16, 2, 2), (True, 16, 1, 4), (True, 8, 2, 0),
                                                       (False, 64, 2, 0)])
def test_each_core_gets_its_share_of_grammar_workers(monkeypatch, gpus, cpus, size, workers):
    """By default each engine core starts grammar workers for its share of the host's cores, not
    for all of them (data parallel cores would otherwise start as many each); a set count stays."""
    import engine.data_parallel as dp

    started = []

    class Handle:
        def wait_ready(self) -> None:
            pass

    monkeypatch.setattr(dp.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(dp, "core_devices", lambda config, n: [str(i) if gpus else None for i in range(n)])
    monkeypatch.setattr(dp, "start_engine_core", lambda config, *a, **k: started.append(config) or Handle())
    dp.start_engine_cores(EngineConfig(model="gpt2"), size)
    assert [c.grammar_workers for c in started] == [workers] * size
    started.clear()
    dp.start_engine_cores(EngineConfig(model="gpt2", grammar_workers=3), size)
    assert [c.grammar_workers for c in started] == [3] * size
