"""The per-step bookkeeping of a greedy multi-step decode graph, in one launch.

Each step of the captured run derives, for every row of the batch, its position (the run's
base position plus the step index), its context length (0 for padding rows) and the cache slot
its new K/V go to (looked up in the row's block table; -1 for padding rows). In torch that is a
dozen element-wise launches a step, each a couple of microseconds at decode batch sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# One compile for every batch size and step: the step index and the row count vary from launch to
# launch (each captured batch size, each step of a run), and Triton would otherwise compile a
# variant per value class (== 1, a multiple of 16, other) and per power-of-two row tile. That had
# made dozens of compiles of this tiny kernel, seconds of a cold start; the specialisations buy
# nothing here (they only feed masks).
ROWS_PER_PROGRAM = 128


@triton.jit(do_not_specialize=["step", "num_rows"])
def _decode_step_inputs_kernel(
    base_pos_ptr, active_ptr, tables_ptr, positions_ptr, seq_lens_ptr, slots_ptr,
    step, num_rows, stride_table, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    in_batch = rows < num_rows
    pos = tl.load(base_pos_ptr + rows, mask=in_batch, other=0) + step
    live = tl.load(active_ptr + rows, mask=in_batch, other=0) != 0
    block = tl.load(tables_ptr + rows * stride_table + pos // BLOCK_SIZE, mask=in_batch & live, other=0).to(tl.int64)
    tl.store(positions_ptr + rows, pos, mask=in_batch)
    tl.store(seq_lens_ptr + rows, tl.where(live, pos + 1, 0).to(seq_lens_ptr.dtype.element_ty), mask=in_batch)
    tl.store(slots_ptr + rows, tl.where(live, block * BLOCK_SIZE + pos % BLOCK_SIZE, -1), mask=in_batch)


def decode_step_inputs(base_pos: torch.Tensor, active: torch.Tensor, block_tables: torch.Tensor, step: int,
                       block_size: int, positions: torch.Tensor, seq_lens: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """For rows r: positions[r] = base_pos[r] + step; seq_lens[r] = positions[r] + 1 if active[r]
    else 0; slot_mapping[r] = the cache slot of positions[r] in block_tables[r] if active[r] else -1.
    base_pos, positions, slot_mapping int64; seq_lens and block_tables int32; active bool."""
    rows = base_pos.shape[0]
    assert active.shape == positions.shape == seq_lens.shape == slot_mapping.shape == (rows,)
    assert base_pos.dtype == positions.dtype == slot_mapping.dtype == torch.int64 and active.dtype == torch.bool
    assert block_tables.dtype == torch.int32 and block_tables.shape[0] >= rows and block_tables.stride(1) == 1
    if rows == 0:
        return
    _decode_step_inputs_kernel[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
        base_pos, active, block_tables, positions, seq_lens, slot_mapping, step, rows, block_tables.stride(0),
        BLOCK_SIZE=block_size, ROWS=ROWS_PER_PROGRAM, num_warps=4,
    )
