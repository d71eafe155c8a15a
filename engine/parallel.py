"""Tensor parallelism over torch.distributed: how a model splits across ranks, and the collectives.

Megatron's split: the fused q/k/v and gate/up projections are column-parallel (each rank holds
its heads and its slice of the MLP), o_proj and down_proj row-parallel followed by an all-reduce,
the embedding and the LM head vocabulary-parallel (a masked lookup summed across ranks; each rank's
logits gathered). KV heads split across ranks, or are replicated when there are more ranks than KV
heads. NCCL on CUDA, gloo on the CPU: the same code.

The engine's process is rank 0 (it schedules, samples and owns the block tables); ranks 1..N-1
are worker processes (`engine.tp_group` starts them, `engine.model_runner.run_tp_worker` is their
loop) that receive each step's inputs as two broadcast tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import ModelConfig


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group (size 1: no group, no collectives)."""

    rank: int = 0
    size: int = 1

    # ---- how the model splits ---------------------------------------------------------
    def heads(self, num_heads: int) -> int:
        return num_heads // self.size

    def head_range(self, num_heads: int) -> tuple[int, int]:
        n = self.heads(num_heads)
        return self.rank * n, (self.rank + 1) * n

    def kv_heads(self, num_kv_heads: int) -> int:
        """KV heads this rank holds: its share, or one (replicated) when ranks outnumber them."""
        return max(1, num_kv_heads // self.size)

    def kv_head_range(self, num_kv_heads: int) -> tuple[int, int]:
        if num_kv_heads >= self.size:
            n = num_kv_heads // self.size
            return self.rank * n, (self.rank + 1) * n
        first = self.rank // (self.size // num_kv_heads)  # ranks sharing one KV head sit side by side
        return first, first + 1

    def split(self, n: int) -> tuple[int, int]:
        """This rank's slice of a dimension of size n (n divisible by the group size)."""
        part = n // self.size
        return self.rank * part, (self.rank + 1) * part

    # ---- collectives --------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (the row-parallel projections' partial outputs)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, cols] shards side by side -> [rows, size * cols] (the vocabulary-parallel logits)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=1)


SINGLE = TensorParallel()


def check_divisible(config: ModelConfig, size: int) -> None:
    """Refuse, with the reason, a tensor-parallel size this model cannot split into."""
    if size < 1:
        raise ValueError("--tensor-parallel-size must be at least 1")
    if size == 1:
        return
    c = config
    problems = []
    if c.num_heads % size:
        problems.append(f"{c.num_heads} attention heads")
    if c.num_kv_heads >= size and c.num_kv_heads % size:
        problems.append(f"{c.num_kv_heads} KV heads")
    if c.num_kv_heads < size and size % c.num_kv_heads:
        problems.append(f"{c.num_kv_heads} KV heads (to replicate, the size must be a multiple of them)")
    if c.intermediate_size % size:
        problems.append(f"an MLP of {c.intermediate_size}")
    if problems:
        raise ValueError(f"--tensor-parallel-size {size} does not divide this model: it has {' and '.join(problems)}")


def shard_rows(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """The rows of `tensor` in `ranges`, in order (a fused projection's per-rank slices)."""
    return torch.cat([tensor[a:b] for a, b in ranges]) if len(ranges) > 1 else tensor[ranges[0][0]:ranges[0][1]]
