"""The prefill attention kernel's work list, built on the host (numpy only: no Triton import, so
the engine builds it on any install).

One entry per (sequence, block of `block_m` query rows), `seq << TILE_SEQ_SHIFT | row_block`,
and -1 for none: the kernel's grid is the list's length, which depends only on the token count
and the sequence slots, never on how the tokens split between sequences.
"""

from __future__ import annotations

import numpy as np

# A tile is `seq << TILE_SEQ_SHIFT | row_block`: 32k sequence slots, 64k row blocks.
TILE_SEQ_SHIFT = 16


def max_prefill_tiles(num_tokens: int, num_seqs: int, block_m: int) -> int:
    """Tiles any step of at most `num_tokens` tokens over at most `num_seqs` sequences needs."""
    return -(-num_tokens // block_m) + num_seqs


def prefill_tiles(query_lens: np.ndarray, block_m: int, out: np.ndarray | None = None) -> np.ndarray:
    """The tile list for sequences with these query lengths (int32; `out`, when given, is filled
    and its unused tail set to -1)."""
    query_lens = np.asarray(query_lens, dtype=np.int64)
    per_seq = -(-query_lens // block_m)
    total = int(per_seq.sum())
    seq_of_tile = np.repeat(np.arange(len(query_lens), dtype=np.int64), per_seq)
    first_tile = np.repeat(np.cumsum(per_seq) - per_seq, per_seq)
    tiles = (seq_of_tile << TILE_SEQ_SHIFT) | (np.arange(total, dtype=np.int64) - first_tile)
    if out is None:
        return tiles.astype(np.int32)
    assert total <= len(out), "more prefill tiles than the buffer holds"
    out[:total] = tiles
    out[total:] = -1
    return out
