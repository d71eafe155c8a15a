"""Block manager unit tests: plain Python, no torch."""

import subprocess
import sys

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def make_seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=4))


def test_pure_modules_do_not_import_torch():
    code = (
        "import sys, engine.block_manager, engine.scheduler, engine.sequence;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_grows_table_and_free_returns_all_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(10))
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert bm.allocate(seq, 13)  # one more block
    assert len(seq.block_table) == 4
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_allocate_fails_without_side_effects():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(range(12))
    assert not bm.allocate(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_prefix_cache_hit_after_full_blocks_are_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(range(10), "a")
    assert bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    assert len(a.block_hashes) == 2  # 2 full blocks of 4; the 3rd is partial
    b = make_seq(list(range(8)) + [99, 98, 97], "b")
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.allocate(b, 11, hits)
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[hits[0]].ref_count == 2
    # Different first block: no hit, even though later tokens match.
    c = make_seq([7] + list(range(1, 10)), "c")
    assert bm.find_cached_prefix(c) == []


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(range(8), "a")
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    same = make_seq(range(8), "b")
    # 8 tokens = 2 full blocks cached, but at most 7 tokens may be reused.
    assert len(bm.find_cached_prefix(same)) == 1


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    first_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4
    # Still cached after free:
    b = make_seq([1, 2, 3, 4, 9], "b")
    assert bm.find_cached_prefix(b) == first_blocks[:2]
    # Allocating everything evicts the cached blocks.
    c = make_seq(range(100, 108), "c")
    assert bm.allocate(c, 8)
    assert bm.find_cached_prefix(b) == []
    assert bm.cached_block_by_hash == {}


def test_revived_cached_blocks_count_against_free_space():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_seq([1, 2, 3, 4], "a")
    bm.allocate(a, 4)
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a)
    bm.free(a)
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8], "b")
    hits = bm.find_cached_prefix(b)
    assert len(hits) == 2
    # needs 4 blocks total: 2 revived + 2 new, but only 3 exist.
    assert not bm.can_allocate(b, 8, hits)
    assert bm.can_allocate(b, 6, hits)
    assert bm.allocate(b, 6, hits) and bm.num_free_blocks == 0


def test_usage_and_prefix_stats():
    bm = BlockManager(num_blocks=10, block_size=4)
    s = make_seq(range(8))
    bm.allocate(s, 8)
    assert bm.usage() == 0.2
    bm.record_prefix_query(8, 4)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (8, 4)
