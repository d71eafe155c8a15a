"""Data parallel: several engine cores (each its own process, GPU or tensor-parallel group) behind
one API process, standing in for one engine inside AsyncEngine.

Each request goes to the least-loaded live core, unless a core already holds its prompt's
leading blocks (it served a request with the same prefix, so its prefix cache has them) and is
not much busier than the least-loaded one: prefix affinity. A core that dies fails only its own
requests (their streams end with EngineDead: 503 before the first byte); the others keep
serving, and `dead_cores` says which died (/health reports it). Gauges add up the live cores.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import replace
from multiprocessing.connection import wait as wait_connections

from engine.config import EngineConfig
from engine.engine_process import EngineCoreClient, EngineCoreHandle, start_engine_core
from engine.errors import EngineDead
from engine.grammar_workers import default_grammar_workers
from engine.llm_engine import RequestOutput, StepStats
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

logger = logging.getLogger(__name__)

# Prefix lengths (in KV blocks) remembered per request for affinity; the longest that matches wins.
AFFINITY_BLOCKS = (1, 2, 4, 8, 16, 32)
AFFINITY_ENTRIES = 65536


class DataParallelClient:
    """N engine-core clients behind the interface AsyncEngine drives (see EngineCoreClient)."""

    accepts_commands_while_stepping = True

    def __init__(self, cores: list[EngineCoreClient], block_size: int, max_num_seqs: int,
                 owned: list[EngineCoreHandle] | None = None) -> None:
        """`owned`: engine processes this client started (and reaps on shutdown)."""
        self.cores = cores
        self.owned = owned or []
        first = cores[0]
        self.config = first.config
        self.tokenizer = first.tokenizer
        self.model_config = first.model_config
        self.max_model_len = first.max_model_len
        self.block_size = block_size
        # How much busier than the least-loaded core the affine one may be and still get the request.
        self.affinity_slack = max(4, max_num_seqs // 4)
        self.requests: dict[str, int] = {}  # unfinished request id -> core
        self.dead_cores: dict[int, str] = {}
        self.last_step = self._sum([c.last_step for c in cores])
        self._prefix_owner: OrderedDict[int, int] = OrderedDict()
        self.routed = [0] * len(cores)  # requests sent to each core, for tests and logs
        self._closing = False

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    @property
    def num_waiting(self) -> int:
        return sum(c.num_waiting for i, c in enumerate(self.cores) if i not in self.dead_cores)

    def make_sequence(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Sequence:
        return self.cores[0].make_sequence(request_id, prompt, params)

    # ---- routing ------------------------------------------------------------------------
    def _load(self, i: int) -> int:
        core = self.cores[i]
        return core.num_unfinished + core._waiting_elsewhere

    def _prefix_keys(self, token_ids: list[int]) -> list[int]:
        full = len(token_ids) // self.block_size
        return [hash(tuple(token_ids[:n * self.block_size])) for n in AFFINITY_BLOCKS if n <= full]

    def choose_core(self, seq: Sequence) -> int:
        live = [i for i in range(len(self.cores)) if i not in self.dead_cores]
        if not live:
            raise EngineDead("every data-parallel engine core has died")
        least = min(live, key=lambda i: (self._load(i), self.routed[i]))  # ties: the one sent fewer
        keys = self._prefix_keys(seq.prompt_token_ids)
        chosen = least
        for key in reversed(keys):  # the longest shared prefix first
            owner = self._prefix_owner.get(key)
            if owner is not None and owner not in self.dead_cores:
                if self._load(owner) <= self._load(least) + self.affinity_slack:
                    chosen = owner
                break
        for key in keys:
            self._prefix_owner[key] = chosen
            self._prefix_owner.move_to_end(key)
        while len(self._prefix_owner) > AFFINITY_ENTRIES:
            self._prefix_owner.popitem(last=False)
        return chosen

    def add_sequence(self, seq: Sequence) -> None:
        core = self.choose_core(seq)
        self.cores[core].add_sequence(seq)
        self.requests[seq.request_id] = core
        self.routed[core] += 1

    def abort_request(self, request_id: str) -> bool:
        core = self.requests.pop(request_id, None)
        return core is not None and self.cores[core].abort_request(request_id)

    # ---- stepping -----------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return any(c.has_unfinished() for i, c in enumerate(self.cores) if i not in self.dead_cores)

    def step(self) -> list[RequestOutput]:
        """Outputs of whichever cores reported (waits for at least one)."""
        outputs: list[RequestOutput] = []
        for i, core in enumerate(self.cores):
            if i not in self.dead_cores and core._results.closed:  # stopped by shutdown
                outputs.extend(self._core_died(i, "its pipes were closed"))
        live = {c._results: i for i, c in enumerate(self.cores) if i not in self.dead_cores and c.has_unfinished()}
        if not live:
            if outputs or self._closing:
                return outputs
            raise EngineDead("every data-parallel engine core has died")
        for conn in wait_connections(list(live)):
            i = live[conn]
            try:
                outputs.extend(self.cores[i].step())
            except EngineDead as exc:
                outputs.extend(self._core_died(i, exc.message))
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        self.last_step = self.live_stats()
        return outputs

    def _core_died(self, i: int, message: str) -> list[RequestOutput]:
        """Fail core i's requests (their streams end with EngineDead) and route around it."""
        self.dead_cores[i] = message
        if not self._closing:
            logger.error("data-parallel engine core %d died (%s): failing its requests, serving on the others", i, message)
        lost = [rid for rid, core in self.requests.items() if core == i]
        return [RequestOutput(rid, [], "", True, finish_reason="abort", error=f"engine core {i} died: {message}")
                for rid in lost]

    def live_stats(self) -> StepStats:
        return self._sum([c.live_stats() for i, c in enumerate(self.cores) if i not in self.dead_cores])

    @staticmethod
    def _sum(stats: list[StepStats]) -> StepStats:
        if not stats:
            return StepStats(0, 0, 0.0, 0, 0)
        return StepStats(
            sum(s.num_running for s in stats), sum(s.num_waiting for s in stats),
            sum(s.kv_cache_usage for s in stats) / len(stats),  # each core's cache is the same size
            sum(s.num_batched_tokens for s in stats), sum(s.num_preemptions for s in stats),
            sum(s.prefix_cache_queries for s in stats), sum(s.prefix_cache_hits for s in stats),
        )

    def health(self) -> dict:
        return {"engine_cores": len(self.cores), "dead_cores": {str(i): m for i, m in sorted(self.dead_cores.items())}}

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._closing = True
        for core in self.cores:
            core.shutdown(timeout_s)
        for handle in self.owned:
            handle.stop(timeout_s)


def core_devices(config: EngineConfig, size: int) -> list[str | None]:
    """Each core's GPUs (CUDA_VISIBLE_DEVICES): core i gets tensor_parallel_size GPUs from i times
    that; on the CPU, None (the cores share the cores)."""
    from engine.model_runner import resolve_device

    if resolve_device(config.device).type != "cuda":
        return [None] * size
    tp = config.tensor_parallel_size
    return [",".join(str(i * tp + r) for r in range(tp)) for i in range(size)]


def start_engine_cores(config: EngineConfig, size: int, num_clients: int = 1) -> list[EngineCoreHandle]:
    """Start `size` engine processes, loading at the same time, each with `num_clients` pipe pairs."""
    devices = core_devices(config, size)
    if config.grammar_workers is None:  # the default per core, from its share of the host's cores
        share = (os.cpu_count() or 1) // size
        config = replace(config, grammar_workers=default_grammar_workers("cuda" if devices[0] else "cpu", share))
    handles = [start_engine_core(config, num_clients, visible_devices=d, wait=False) for d in devices]
    try:
        for handle in handles:
            handle.wait_ready()
    except BaseException:
        for handle in handles:
            handle.stop(5)
        raise
    return handles


def engine_client(config: EngineConfig, links: list, owned: list[EngineCoreHandle] | None = None):
    """What AsyncEngine drives for these engine processes, given this API process's (pipes, info)
    to each: the one core's client, or a DataParallelClient over several. `owned`: the handles of
    engine processes started here, reaped on shutdown."""
    cores = [EngineCoreClient(config, pipes, info) for pipes, info in links]
    if len(cores) == 1 and not owned:
        return cores[0]
    return DataParallelClient(cores, config.block_size, config.max_num_seqs, owned=owned)


def links_of(handles: list[EngineCoreHandle], client: int = 0) -> list:
    """Pipe pair `client` of each engine process, with what it reported: what an API process needs."""
    return [(h.pipes[client], h.info) for h in handles]
