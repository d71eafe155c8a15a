"""Constrained decoding's mask on the logits: tokens whose bit is 0 in a row's packed bitmask
(xgrammar's layout: int32 words, token t at bit t % 32 of word t // 32) become -inf, in place.

On CUDA one launch reads the bitmask (vocab / 8 bytes a row) and writes only the masked-out
logits; unpacking the bits with torch took four launches and two [rows, vocab] temporaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # tokens a program covers: 13 programs a row for GPT-2's 50,257


@triton.jit
def _mask_logits_kernel(logits_ptr, bitmask_ptr, stride_logits, stride_bitmask, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab
    words = tl.load(bitmask_ptr + row * stride_bitmask + tokens // 32, mask=in_vocab, other=-1)
    allowed = ((words >> (tokens % 32)) & 1) != 0
    minus_inf = tl.full([BLOCK], float("-inf"), tl.float32)
    tl.store(logits_ptr + row * stride_logits + tokens, minus_inf, mask=in_vocab & ~allowed)


def mask_logits_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set logits [rows, vocab] (float32, contiguous rows) to -inf where `bitmask` [rows, >=
    ceil(vocab / 32)] int32, on the same device, has a 0 bit. Returns `logits`."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and bitmask.dtype == torch.int32 and bitmask.shape[0] == rows
    assert bitmask.shape[1] * 32 >= vocab
    if rows:
        _mask_logits_kernel[(rows, triton.cdiv(vocab, BLOCK))](logits, bitmask, logits.stride(0), bitmask.stride(0),
                                                                vocab, BLOCK=BLOCK, num_warps=4)
    return logits
