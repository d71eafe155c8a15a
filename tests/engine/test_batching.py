"""Continuous batching, prefix caching, preemption and block accounting on the tiny Llama."""

import pytest

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from engine.model_runner import shared_prefix_tokens

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [
    "The quick brown fox jumps over the lazy dog and keeps running",
    "In 1492 Columbus sailed",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z a b c d e f",
    "Numbers: 1 2 3",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor",
]


def alone(llm: LLM, prompt, params=GREEDY) -> list[int]:
    return llm.generate([prompt], params)[0].token_ids


def drain(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def assert_all_blocks_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests


def test_requests_added_mid_decode_match_running_alone(tiny_llm):
    expected = {p: alone(tiny_llm, p) for p in PROMPTS}
    engine = tiny_llm.engine
    got: dict[str, list[int]] = {}
    engine.add_request("r0", PROMPTS[0], GREEDY)
    engine.add_request("r1", PROMPTS[1], GREEDY)
    step = 0
    pending = list(enumerate(PROMPTS))[2:]
    while engine.has_unfinished() or pending:
        step += 1
        if pending and step % 3 == 0:  # join while the others are decoding
            i, p = pending.pop(0)
            engine.add_request(f"r{i}", p, GREEDY)
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    for i, p in enumerate(PROMPTS):
        assert got[f"r{i}"] == expected[p], p
    assert_all_blocks_free(engine)


def test_shared_prefix_hits_cache_and_keeps_tokens(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, num_kv_blocks=64, max_num_batched_tokens=256)
    prefix = "System: you are a terse assistant that answers questions about geography. " * 3
    prompts = [prefix + q for q in ("Where is Peru?", "Where is Chad?", "What is the largest ocean?")]
    expected = [alone(llm, p) for p in prompts]
    bm = llm.engine.block_manager
    hits_before = bm.prefix_cache_hits
    # First request alone fills the cache; the next two share its prefix blocks.
    got = [llm.generate([prompts[0]], GREEDY)[0].token_ids]
    got += [o.token_ids for o in llm.generate(prompts[1:], GREEDY)]
    assert got == expected
    prefix_tokens = len(llm.tokenizer.encode(prefix))
    assert bm.prefix_cache_hits - hits_before >= 3 * (prefix_tokens // 16) * 16
    assert_all_blocks_free(llm.engine)


def test_rows_that_share_a_cached_prompt_prefix_share_its_blocks(tiny_llama_dir):
    """What cascade decoding reads once for a batch (CudaGraphDecoder's cascade graphs): the whole
    cache blocks of a prompt prefix that every running row's block table starts with."""
    llm = LLM(tiny_llama_dir, num_kv_blocks=64, max_num_batched_tokens=256)
    prefix = list(range(1000, 1040))  # two whole blocks of 16 and 8 tokens more
    llm.generate([prefix + [7]], GREEDY)  # fills the prefix cache
    engine = llm.engine
    for i in range(3):
        engine.add_request(f"r{i}", prefix + [50 + i, 60 + i], GREEDY)
    engine.step()  # their prefill, the prefix's two blocks from the cache
    seqs = list(engine.scheduler.running)
    rows = engine.runner.block_rows
    tables = rows.table_np[[rows.row_of(s) for s in seqs]].copy()
    lengths = [s.num_tokens for s in seqs]
    assert len(seqs) == 3 and shared_prefix_tokens(tables, lengths, 16) == 32
    assert shared_prefix_tokens(tables[:1], lengths[:1], 16) == 0  # a row alone shares nothing
    assert shared_prefix_tokens(tables, [17, 40, 40], 16) == 16  # only blocks before each row's newest token
    tables[2, 1] = tables[2, 1] + 1  # a row whose second block is its own
    assert shared_prefix_tokens(tables, lengths, 16) == 16
    while engine.has_unfinished():
        engine.step()
    assert_all_blocks_free(engine)


def test_prefix_cache_off_counts_nothing(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, num_kv_blocks=64, enable_prefix_caching=False)
    p = "Repeat after me: " * 10
    assert alone(llm, p) == alone(llm, p)
    assert llm.engine.block_manager.prefix_cache_hits == 0


def test_preemption_under_kv_pressure_gives_same_tokens(tiny_llama_dir, tiny_llm):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in tiny_llm.generate(PROMPTS, params)]
    # 12 blocks x 16 tokens = 192 slots; five requests need ~300.
    small = LLM(tiny_llama_dir, num_kv_blocks=12, max_num_batched_tokens=64, enable_prefix_caching=False)
    got = [o.token_ids for o in small.generate(PROMPTS, params)]
    assert small.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert_all_blocks_free(small.engine)


def test_preemption_with_prefix_cache_and_chunked_prefill(tiny_llama_dir, tiny_llm):
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    prompts = [PROMPTS[0] * 4, PROMPTS[0] * 4 + " and", PROMPTS[2] * 2, PROMPTS[4]]
    expected = [o.token_ids for o in tiny_llm.generate(prompts, params)]
    small = LLM(tiny_llama_dir, num_kv_blocks=16, max_num_batched_tokens=32)
    got = [o.token_ids for o in small.generate(prompts, params)]
    assert got == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(small.engine)


def test_abort_mid_decode_and_while_waiting_frees_everything(tiny_llm):
    engine = tiny_llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"a{i}", p, SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.0))
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort_request("a0") and engine.abort_request("a3")
    assert not engine.abort_request("a0")  # already gone
    engine.step()
    for i in (1, 2, 4):
        engine.abort_request(f"a{i}")
    assert_all_blocks_free(engine)


def test_finished_requests_free_their_blocks(tiny_llm):
    outs = tiny_llm.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0.8, seed=3))
    assert all(len(o.token_ids) <= 5 for o in outs)
    assert_all_blocks_free(tiny_llm.engine)


@pytest.mark.parametrize("budget", [7, 16, 1000])
def test_chunked_prefill_budgets_do_not_change_tokens(tiny_llama_dir, tiny_llm, budget):
    prompt = PROMPTS[2] * 3
    expected = alone(tiny_llm, prompt)
    llm = LLM(tiny_llama_dir, num_kv_blocks=64, max_num_batched_tokens=budget, enable_prefix_caching=False)
    assert alone(llm, prompt) == expected
