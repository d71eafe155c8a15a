"""Scheduler unit tests: plain Python, no torch."""

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence, SequenceStatus


def make(num_blocks=32, block_size=4, **kw):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(**kw), bm), bm


def seq(rid, n, start=0):
    return Sequence(rid, list(range(start, start + n)), SamplingParams(max_tokens=8))


def run_step(sched, sampled_token=1):
    """Pretend the model ran: advance counts, append a token to sampling sequences."""
    out = sched.schedule()
    sched.on_step_done(out)
    for s in out.scheduled:
        if s.samples_next_token:
            s.seq.token_ids.append(sampled_token)
    return out


def test_prefill_then_decode_one_token_each():
    sched, _ = make()
    a, b = seq("a", 5), seq("b", 3, 100)
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 5), ("b", 3)]
    out = run_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens, s.num_computed_tokens) for s in out.scheduled] == [("a", 1, 5), ("b", 1, 3)]


def test_token_budget_chunks_long_prompts_alongside_decodes():
    sched, _ = make(max_num_batched_tokens=8)
    a = seq("a", 3)
    sched.add(a)
    run_step(sched)
    long = seq("long", 20, 50)
    sched.add(long)
    out = run_step(sched)
    # a decodes 1 token, long gets the remaining 7 of the budget.
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("long", 7)]
    assert not out.scheduled[1].samples_next_token
    out = run_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("long", 7)]
    out = run_step(sched)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("long", 6)]
    assert out.scheduled[1].samples_next_token


def test_no_chunked_prefill_waits_for_budget():
    sched, _ = make(max_num_batched_tokens=8, enable_chunked_prefill=False)
    sched.add(seq("a", 20))
    assert sched.schedule().is_empty


def test_max_num_seqs_caps_the_batch():
    sched, _ = make(max_num_seqs=2)
    for i in range(3):
        sched.add(seq(str(i), 2, 10 * i))
    out = run_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_preemption_recompute_frees_blocks_of_latest_request():
    # 4 blocks of 4 tokens; two sequences of 7 tokens each take 2 blocks.
    sched, bm = make(num_blocks=4)
    a, b = seq("a", 7), seq("b", 7, 100)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled (7 computed, 8 known tokens), 2 blocks each
    run_step(sched)  # both decode token 8: still 2 blocks each
    assert bm.num_free_blocks == 0
    out = run_step(sched)  # a needs a 3rd block for its 9th token: b is preempted
    assert [s.request_id for s in out.preempted] == ["b"]
    assert [s.seq.request_id for s in out.scheduled] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert sched.waiting[0] is b and sched.num_preemptions == 1


def test_finish_frees_blocks_and_leaves_queues():
    sched, bm = make()
    a = seq("a", 6)
    sched.add(a)
    run_step(sched)
    sched.finish(a, "stop")
    assert bm.num_free_blocks == bm.num_blocks
    assert not sched.has_unfinished() and a.status is SequenceStatus.FINISHED


def test_prefix_cache_hits_skip_computation():
    sched, bm = make()
    a = seq("a", 9)
    sched.add(a)
    run_step(sched)
    b = seq("b", 10)  # same first 9 tokens, so 2 full blocks (8 tokens) are cached
    sched.add(b)
    out = run_step(sched)
    sb = [s for s in out.scheduled if s.seq is b][0]
    assert sb.num_computed_tokens == 8 and sb.num_new_tokens == 2
    assert bm.prefix_cache_hits == 8 and b.num_cached_tokens == 8


def test_token_budget_defaults_by_device(tiny_llama_dir):
    from engine import LLM
    from engine.config import default_max_num_batched_tokens

    assert default_max_num_batched_tokens("cpu") == 2048
    assert default_max_num_batched_tokens("cuda", 141 * 1024**3) == 8192
    assert default_max_num_batched_tokens("cuda", 24 * 1024**3) == 4096
    llm = LLM(tiny_llama_dir, num_kv_blocks=16)
    assert llm.engine.config.max_num_batched_tokens == 2048
    assert llm.engine.scheduler.config.max_num_batched_tokens == 2048
    assert LLM(tiny_llama_dir, num_kv_blocks=16, max_num_batched_tokens=96).engine.scheduler.config.max_num_batched_tokens == 96


def test_prompt_tokens_while_decoding_are_capped():
    """With a stream decoding, a long prompt is admitted in chunks of at most the cap (so the
    stream's inter-token gap stays one small step); with nobody decoding, at the whole budget."""
    sched, _ = make(num_blocks=64, max_num_batched_tokens=16, max_prefill_tokens_while_decoding=5)
    sched.add(seq("a", 3))
    run_step(sched)  # a's prompt: a decodes from now on
    long = seq("long", 40, 50)
    sched.add(long)
    sched.add(seq("b", 4, 200))
    chunks = []
    while long.num_computed_tokens < 40:
        out = run_step(sched)
        new = {s.seq.request_id: s.num_new_tokens for s in out.scheduled}
        assert new["a"] == 1 and sum(n for r, n in new.items() if r != "a") <= 5, new
        chunks.append(new.get("long", 0))
    assert sum(chunks) == 40 and max(chunks) == 5

    idle, _ = make(num_blocks=64, max_num_batched_tokens=16, max_prefill_tokens_while_decoding=5)
    idle.add(seq("long", 40, 50))
    assert [s.num_new_tokens for s in run_step(idle).scheduled] == [16]  # nobody decodes: the whole budget
