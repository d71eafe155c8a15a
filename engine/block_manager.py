"""Paged KV-cache block allocation with prefix caching. Plain Python: no torch.

Blocks hold `block_size` tokens of K/V for every layer. A full block whose
tokens have been computed is registered under a chained hash of its tokens
and of every token before it, so a later prompt with the same prefix reuses
it. Freed blocks keep their hash and sit in an LRU free queue until a new
allocation evicts them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq

from engine.sequence import Sequence


def chain_hash(parent_hash: int | None, block_token_ids: Seq[int]) -> int:
    """Hash of a full block given the hash of the block before it."""
    return hash((parent_hash, tuple(block_token_ids)))


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None


class BlockManager:
    """Owns every KV block: ref counts, the prefix-cache map and the free queue."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first (evicted first).
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached_block_by_hash: dict[int, int] = {}
        # Prefix-cache statistics, in tokens (as vLLM reports them).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`.

        At most `num_tokens - 1` tokens are reused: the last prompt token must
        be computed again so the step produces logits for it.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        parent: int | None = None
        bs = self.block_size
        for i in range(max_blocks):
            h = chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            block_id = self.cached_block_by_hash.get(h)
            if block_id is None:
                break
            hits.append(block_id)
            parent = h
        return hits

    def record_prefix_query(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens

    # ---- allocation ----------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_total_tokens: int, cached_block_ids: Seq[int] = ()) -> bool:
        num_new = self.blocks_needed(num_total_tokens) - len(seq.block_table) - len(cached_block_ids)
        # Cached blocks nobody holds are in the free queue; taking them shrinks it.
        num_revived = sum(1 for b in cached_block_ids if self.blocks[b].ref_count == 0)
        return num_new <= self.num_free_blocks - num_revived

    def allocate(self, seq: Sequence, num_total_tokens: int, cached_block_ids: Seq[int] = ()) -> bool:
        """Grow `seq.block_table` to hold `num_total_tokens` tokens.

        `cached_block_ids` (only for a sequence with no blocks yet) become the
        start of its table. Returns False and changes nothing if blocks run out.
        """
        if cached_block_ids and seq.block_table:
            raise ValueError("cached blocks can only start an empty block table")
        if not self.can_allocate(seq, num_total_tokens, cached_block_ids):
            return False
        for block_id in cached_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(block.block_hash)  # type: ignore[arg-type]
        while len(seq.block_table) < self.blocks_needed(num_total_tokens):
            seq.block_table.append(self._pop_free_block())
        return True

    def _pop_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            # Evict: the block's old contents are about to be overwritten.
            if self.cached_block_by_hash.get(block.block_hash) == block_id:
                del self.cached_block_by_hash[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_full):
            h = chain_hash(parent, seq.token_ids[i * bs:(i + 1) * bs])
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached_block_by_hash:
                self.cached_block_by_hash[h] = block.block_id
                block.block_hash = h
            seq.block_hashes.append(h)
            parent = h

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq`; tail blocks go first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
