"""GPT-2's input embedding, token plus position, in one launch instead of two lookups and an add."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _embed_add_kernel(ids_ptr, positions_ptr, wte_ptr, wpe_ptr, out_ptr, hidden, stride_wte, stride_wpe, stride_out,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    tok = tl.load(ids_ptr + row).to(tl.int64)
    pos = tl.load(positions_ptr + row).to(tl.int64)
    x = tl.load(wte_ptr + tok * stride_wte + cols, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(wpe_ptr + pos * stride_wpe + cols, mask=mask, other=0.0).to(tl.float32)
    # torch adds in fp32 and rounds once to the model dtype: so do we
    tl.store(out_ptr + row * stride_out + cols, (x + p).to(out_ptr.dtype.element_ty), mask=mask)


def embed_add(input_ids: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor) -> torch.Tensor:
    """wte[input_ids] + wpe[positions] (GPT-2's input embedding) in one launch."""
    assert input_ids.shape == positions.shape and input_ids.dim() == 1
    assert wte.shape[1] == wpe.shape[1] and wte.stride(1) == 1 and wpe.stride(1) == 1 and wte.dtype == wpe.dtype
    rows, hidden = input_ids.shape[0], wte.shape[1]
    out = torch.empty(rows, hidden, dtype=wte.dtype, device=wte.device)
    if rows:
        _embed_add_kernel[(rows,)](input_ids, positions, wte, wpe, out, hidden, wte.stride(0), wpe.stride(0),
                                   out.stride(0), BLOCK=triton.next_power_of_2(hidden), num_warps=4)
    return out
