"""The tensor-parallel group: worker processes for ranks 1..N-1, and each step's inputs sent to them.

Rank 0 is the engine's own process: it schedules, builds a step's inputs on the host and samples.
Every step it broadcasts those inputs as two int64 tensors (a fixed header, then one packed
payload: token ids, positions, cache slots, sequence offsets and lengths, sampled rows and block
tables), never pickled objects; each rank then runs the same forward over its slices of the
weights and its own paged KV cache, meeting the others in the all-reduces and the logits gather.

A worker that dies is noticed before the next step's broadcast (its process is gone) or by the
collective that loses it (gloo fails at once on a closed socket; NCCL within the group's timeout),
and the engine raises `EngineDead` naming the rank instead of waiting forever.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.errors import EngineDead
from roseinfer_kernels.precompile import spawn_without_main

logger = logging.getLogger(__name__)

STOP, STEP = 0, 1
HEADER_LEN = 8
# A collective that waits longer than this for a rank fails instead of hanging (NCCL, gloo).
GROUP_TIMEOUT = timedelta(seconds=float(os.environ.get("ROSEINFER_TP_TIMEOUT_S", "120")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, size: int, addr: str, port: int, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=size,
                            timeout=GROUP_TIMEOUT, **kwargs)


def local_ranks(config: EngineConfig) -> range:
    """The tensor-parallel ranks this node runs."""
    per_node = config.tensor_parallel_size // config.nnodes
    return range(config.node_rank * per_node, (config.node_rank + 1) * per_node)


def start_workers(config: EngineConfig, port: int, ranks, target) -> list:
    """Worker processes for `ranks` running `target(config, rank, port, joining)` (the model
    runner's worker loop), each started and seen to set `joining` before it joins the group (one
    that dies before would otherwise keep the group waiting for its whole timeout)."""
    ctx = mp.get_context("spawn")
    joining = {rank: ctx.Event() for rank in ranks}
    workers = [ctx.Process(target=target, args=(config, rank, port, joining[rank]), daemon=True,
                           name=f"roseinfer-tp{rank}") for rank in ranks]
    with spawn_without_main():  # a user's unguarded script must not run again in each rank
        for w in workers:
            w.start()
    for rank, w in zip(ranks, workers):
        while not joining[rank].wait(0.1):
            if not w.is_alive():
                for other in workers:
                    other.kill()
                raise EngineDead(f"tensor-parallel worker rank {rank} exited during start-up (code {w.exitcode})")
    return workers


def run_node(config: EngineConfig, target) -> int:
    """A node other than node 0 (`--node-rank` k > 0): run its ranks (`target`, as in
    `start_workers`) until rank 0 stops them."""
    port = config.master_port
    workers = start_workers(config, port, local_ranks(config), target)
    logger.info("node %d: tensor-parallel ranks %s joined %s:%d", config.node_rank, list(local_ranks(config)),
                config.master_addr, port)
    for w in workers:
        w.join()
    return max((abs(w.exitcode or 0) for w in workers), default=0)


def pack_step(inputs, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) of a step: `inputs` a model_runner.StepInputs, `tables` [seqs, max_blocks]."""
    n_tok, n_seq, n_samp = len(inputs.input_ids), len(inputs.seq_lens), len(inputs.logits_indices)
    header = torch.tensor([STEP, n_tok, n_seq, n_samp, tables.shape[1], 0, 0, 0], dtype=torch.int64)
    payload = np.concatenate([inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.query_start_loc,
                              inputs.seq_lens, inputs.logits_indices, tables.numpy().astype(np.int64).ravel()])
    return header, torch.from_numpy(payload)


def receive_step(device: torch.device) -> tuple[list[np.ndarray], torch.Tensor] | None:
    """A worker's side of `TensorParallelGroup.send_step`: the step's arrays (ids, positions,
    slots, query_start_loc, seq_lens, sampled rows) and block tables, or None when told to stop."""
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    dist.broadcast(header, 0)
    kind, n_tok, n_seq, n_samp, max_blocks = header.tolist()[:5]
    if kind == STOP:
        return None
    payload = torch.empty(3 * n_tok + 2 * n_seq + 1 + n_samp + n_seq * max_blocks, dtype=torch.int64, device=device)
    dist.broadcast(payload, 0)
    cuts = np.cumsum([n_tok, n_tok, n_tok, n_seq + 1, n_seq, n_samp])
    *arrays, tables = np.split(payload.cpu().numpy(), cuts)
    return arrays, torch.from_numpy(tables.astype(np.int32).reshape(n_seq, max_blocks))


class TensorParallelGroup:
    """Rank 0's handle on the group: starts the workers, sends each step, stops them."""

    def __init__(self, config: EngineConfig, device: torch.device, target) -> None:
        """`target`: the workers' entry point (see `start_workers`)."""
        self.size = config.tensor_parallel_size
        self.device = device
        port = config.master_port or free_port()
        # This node's ranks past 0; other nodes start theirs (`run_node`) and are not watched here:
        # losing one shows as a failed collective.
        self.workers = start_workers(config, port, local_ranks(config)[1:], target)
        init_group(0, self.size, config.master_addr, port, device)
        self.closed = False
        logger.info("tensor parallel: %d ranks over %s", self.size, dist.get_backend())

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.device.type == "cuda" else t

    def check_alive(self) -> None:
        for rank, w in enumerate(self.workers, start=1):
            if not w.is_alive():
                raise EngineDead(f"tensor-parallel worker rank {rank} exited (code {w.exitcode})")

    def guard(self, error: BaseException) -> EngineDead:
        """The error a failed collective becomes: which worker is gone, if one is."""
        try:
            self.check_alive()
        except EngineDead as dead:
            return dead
        return EngineDead(f"tensor-parallel collective failed: {error}")

    def send_step(self, inputs, tables: torch.Tensor) -> None:
        self.check_alive()
        header, payload = pack_step(inputs, tables)
        try:
            dist.broadcast(self._comm(header), 0)
            dist.broadcast(self._comm(payload), 0)
        except RuntimeError as exc:
            raise self.guard(exc) from exc

    def abort(self) -> None:
        """Stop the workers without a word (start-up failed: they may be anywhere in theirs)."""
        if self.closed:
            return
        self.closed = True
        for w in self.workers:
            w.kill()
            w.join(timeout=10)
        dist.destroy_process_group()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if all(w.is_alive() for w in self.workers):
                stop = torch.zeros(HEADER_LEN, dtype=torch.int64)
                dist.broadcast(self._comm(stop), 0)
        except RuntimeError:
            pass
        for w in self.workers:
            w.join(timeout=10)
            if w.is_alive():
                w.kill()
        dist.destroy_process_group()
