"""Tensors in, sampled tokens out: input preparation, the paged KV cache, the forward pass.

The runner executes what the scheduler decided; it owns the model, the KV
cache (one preallocated tensor per layer), the per-request RNGs, a host
mirror of the block tables that grows by appended blocks only, and on CUDA
the decode step captured as CUDA graphs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import chain

import numpy as np
import torch

from engine.attention import AttentionBackend, AttentionMetadata, TorchAttention
from engine.config import LOG_FORMAT, EngineConfig, default_max_num_batched_tokens
from engine.loader import LoadedModel, load_model
from engine.models.layers import Fp8Linear, configure_decode_kernels
from engine.parallel import TensorParallel
from engine.sampler import (PLAIN, SAMPLING_VARIANTS, TOP_K, SamplerOutput, SamplingBatch, row_sampling_values,
                            sample, sample_rows, sampling_kernels, sampling_variant)
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.tp_group import TensorParallelGroup, init_group, receive_step
from roseinfer_kernels.fp8 import FP8_MAX
from roseinfer_kernels.prefill_tiles import max_prefill_tiles, prefill_tiles

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 512 * 1024**2

# What an fp8 KV cache's scales are measured on (ModelRunner._calibrate_kv_scales): prose, a list,
# code and numbers, about 200 tokens.
KV_CALIBRATION_TEXT = (
    "The committee met on Tuesday to review the budget for the coming year. After a long discussion, "
    "the members agreed to fund three projects: a new library wing, repairs to the old bridge, and a "
    "summer program for children. Costs: 1,250,000 dollars, 480,000 dollars and 95,000 dollars.\n\n"
    "def mean(values):\n    total = sum(values)\n    return total / len(values) if values else 0.0\n\n"
    "Q: What is the boiling point of water at sea level?\nA: 100 degrees Celsius, or 212 degrees "
    "Fahrenheit. At higher altitudes it boils at a lower temperature, because the air pressure is lower."
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return device


def make_attention_backend(name: str, device: torch.device, dtype: str = "auto",
                           kv_cache_dtype: str = "auto") -> AttentionBackend:
    """`auto` picks the Triton kernels on CUDA; on the CPU the C++ kernels for float32 where they
    build (not for an fp8 cache), else plain torch."""
    if name == "cpu" and kv_cache_dtype == "fp8":
        raise ValueError("the CPU attention backend has no fp8 KV cache: use --attention-backend torch")
    if name == "auto":
        if device.type == "cuda":
            name = "triton"
        else:
            from roseinfer_kernels.cpu_build import available

            cpu_ok = dtype in ("auto", "float32") and kv_cache_dtype == "auto"
            name = "cpu" if cpu_ok and available() else "torch"
    if name == "torch":
        return TorchAttention()
    if name == "cpu":
        from engine.cpu_attention import CpuAttention  # compiles the C++ kernels on first use

        return CpuAttention()
    if name == "triton":
        from engine.triton_attention import TritonAttention  # Triton only when asked for

        return TritonAttention()
    raise ValueError(f"unknown attention backend {name!r}")


@dataclass
class StepInputs:
    """A step's inputs on the host (numpy, int64): tokens packed sequence after sequence."""

    input_ids: np.ndarray  # [num_tokens]
    positions: np.ndarray  # [num_tokens]
    slot_mapping: np.ndarray  # [num_tokens] cache slot of each token
    query_start_loc: np.ndarray  # [num_seqs + 1]
    seq_lens: np.ndarray  # [num_seqs] context length after this step
    block_table_rows: np.ndarray  # [num_seqs] rows of BlockTableRows.table
    logits_indices: np.ndarray  # [num_sampling_seqs] token index whose hidden state is sampled

    def num_blocks(self, block_size: int) -> int:
        """Block-table entries the longest sequence of the step needs."""
        return -(-int(self.seq_lens.max()) // block_size)


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class BlockTableRows:
    """Host copy of each running sequence's block table, one row per sequence.

    Rows are written incrementally: a step copies only blocks appended since
    the last step, so per-step work does not grow with context length. A
    block table replaced by the block manager (free or preemption) is
    detected by identity and its row rewritten.
    """

    def __init__(self, num_rows: int, max_blocks: int, pin: bool) -> None:
        self.table = torch.zeros(num_rows, max_blocks, dtype=torch.int32, pin_memory=pin)
        # Written through a numpy view of the same memory: a slice assignment from a list costs
        # about a microsecond there, against 10-15 through torch indexing and torch.tensor, and
        # an 8-step decode run rewrites about half of 256 rows (py-spy: 11% of the engine
        # process's time at a 512-request burst on the H100 host).
        self.table_np = self.table.numpy()
        self.free_rows = list(range(num_rows - 1, -1, -1))
        self.rows: dict[str, tuple[int, list[int], int]] = {}

    def row_of(self, seq: Sequence) -> int:
        entry = self.rows.get(seq.request_id)
        table = seq.block_table
        if entry is None:
            row, written = self.free_rows.pop(), 0
        else:
            row, known, written = entry
            if known is not table:
                written = 0
        if written < len(table):
            self.table_np[row, written:len(table)] = table[written:]
        self.rows[seq.request_id] = (row, table, len(table))
        return row

    def release(self, request_id: str) -> None:
        entry = self.rows.pop(request_id, None)
        if entry is not None:
            self.free_rows.append(entry[0])

    def gather(self, row_ids: torch.Tensor, num_blocks: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The first `num_blocks` entries of rows `row_ids` (int64), [len(row_ids), num_blocks]."""
        return torch.index_select(self.table[:, :num_blocks], 0, row_ids, out=out)


def with_device_defaults(config: EngineConfig, device: torch.device) -> EngineConfig:
    """`config` with the defaults that depend on the device filled in (the token budget)."""
    if config.max_num_batched_tokens is not None:
        return config
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return replace(config, max_num_batched_tokens=default_max_num_batched_tokens(device.type, memory))


class ModelRunner:
    def __init__(self, config: EngineConfig, tp_rank: int = 0, tp_port: int = 0,
                 after_precompile: Callable[[], None] | None = None) -> None:
        """`tp_rank` > 0: a tensor-parallel worker (`run_tp_worker`), joining the group at `tp_port`.
        `after_precompile`: called once the compile pool of a cold start is done (at once when
        there is none), before the graphs are captured."""
        self.device = resolve_device(config.device)
        self.config = config = with_device_defaults(config, self.device)
        self.tp = TensorParallel(tp_rank, config.tensor_parallel_size)
        self.tp_group: TensorParallelGroup | None = None
        if self.tp.size > 1:
            if self.device.type == "cuda":  # rank r on its node's GPU r mod (ranks per node)
                self.device = torch.device("cuda", tp_rank % (self.tp.size // config.nnodes))
                torch.cuda.set_device(self.device)
            if tp_rank == 0:
                self.tp_group = TensorParallelGroup(config, self.device, run_tp_worker)  # this node's other ranks
            else:
                init_group(tp_rank, self.tp.size, config.master_addr, tp_port, self.device)
        try:
            self._build(config, after_precompile)
        except BaseException:
            if self.tp_group is not None:
                self.tp_group.abort()
            raise

    def _build(self, config: EngineConfig, after_precompile: Callable[[], None] | None) -> None:
        """The model, its launch decisions, the KV cache and the CUDA graphs."""
        torch.manual_seed(config.seed)
        self.attention = make_attention_backend(config.attention_backend, self.device, config.dtype, config.kv_cache_dtype)
        cuda_triton = self.device.type == "cuda" and self.attention.name == "triton"  # (not the interpreter's)
        precompiling = self._start_precompile(config) if cuda_triton else None
        self.loaded: LoadedModel = load_model(config, self.device, self.attention, self.tp)
        if precompiling is not None:  # before the launch decisions, which launch kernels
            from roseinfer_kernels.precompile import finish_precompile

            start = time.monotonic()
            done = finish_precompile(precompiling)
            logger.info("precompile: %d of %d kernels in the Triton cache (waited %.1f s)", done,
                        len(precompiling[1]), time.monotonic() - start)
        if after_precompile is not None:
            after_precompile()
        self.model = self.loaded.model
        self.model_config = self.loaded.config
        self.dtype = self.loaded.dtype
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        self.fp8_weights = any(isinstance(m, Fp8Linear) for m in self.model.modules())  # the floor's bytes
        if self.attention.name == "triton":  # the CUDA path: launch decisions made once, here
            configure_decode_kernels(self.model, self.attention, self.device, self.dtype, config.max_num_seqs)
        self.block_size = config.block_size
        mc = self.model_config
        self.kv_heads = self.tp.kv_heads(mc.num_kv_heads)  # this rank's
        self.num_blocks = self._num_kv_blocks()
        if self.tp.size > 1:  # every rank holds the same blocks: the smallest cache any rank affords
            count = torch.tensor([self.num_blocks], device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
            self.num_blocks = int(count.item())
        self.kv_caches = [
            torch.empty(2, self.num_blocks, self.kv_heads, self.block_size, mc.head_dim, dtype=self.kv_dtype, device=self.device)
            for _ in range(mc.num_layers)
        ]
        self.max_model_len = min(
            config.max_model_len or mc.max_position_embeddings,
            mc.max_position_embeddings,
            self.num_blocks * self.block_size,
        )
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.generators: dict[str, torch.Generator] = {}
        # Preempted sequences keep no row, so running ones (<= max_num_seqs) always fit.
        self.block_rows = BlockTableRows(config.max_num_seqs + 1, self.max_blocks_per_seq, self.device.type == "cuda")
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 1
        self.prefill_block_m = 0  # the Triton prefill kernel's query rows per tile (0: another backend)
        if self.attention.name == "triton":
            from roseinfer_kernels.launch_table import prefill_launch

            self.prefill_block_m = prefill_launch(mc.head_dim).block_m
        if self.kv_dtype == torch.float8_e4m3fn:
            self._calibrate_kv_scales()  # before the graphs capture the scales
        self.graphs: CudaGraphDecoder | None = None
        self.mixed_graphs: MixedStepGraphs | None = None
        if self.tp.size > 1 and self.device.type == "cuda" and not config.enforce_eager:
            logger.warning("tensor parallel runs eagerly for now: no CUDA graphs, one decode step at a time")
        elif self.device.type == "cuda" and not config.enforce_eager:
            pool = None
            buckets = mixed_step_token_buckets(config.max_num_batched_tokens, config.cuda_graph_max_tokens)
            if buckets and self.attention.name == "triton":  # captured first: the largest activations
                self.mixed_graphs = MixedStepGraphs(self, buckets)
                pool = self.mixed_graphs.pool
            self.graphs = CudaGraphDecoder(self, [b for b in config.cuda_graph_batch_sizes if b <= config.max_num_seqs], pool)
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB, %s), max_model_len %d, attention %s, dtype %s, device %s, "
            "cuda graphs %s", self.num_blocks, self.block_size, self.kv_cache_bytes / 2**20, self.kv_dtype,
            self.max_model_len, self.attention.name, self.dtype, self.device, "on" if self.graphs else "off",
        )

    def _start_precompile(self, config: EngineConfig):
        """Compile this model's recorded Triton kernels (roseinfer_kernels.precompile's manifest) in worker
        processes while the weights load: a cold start's compiles, which the first launches would
        otherwise make one after another. None when the manifest has none for it."""
        from roseinfer_kernels.precompile import cuda_target, load_manifest, manifest_path, start_precompile

        try:
            entries = load_manifest(manifest_path(), compile_manifest_key(config), cuda_target(self.device))
            started = start_precompile(entries)
            if entries and started is None:
                logger.info("precompile: all %d kernels already in the Triton cache", len(entries))
            return started
        except Exception as exc:  # noqa: BLE001 - only a head start: the launches compile what they need
            logger.warning("precompile: not started (%s)", exc)
            return None

    def one_sequence_meta(self, start: int, end: int) -> AttentionMetadata:
        """A step of tokens start..end-1 of one sequence whose K/V fill the cache's first blocks in
        order, without the scheduler (the fp8 calibration, scripts/fp8_quality.py)."""
        dev = self.device
        blocks = -(-end // self.block_size)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(start, end, device=dev),
            query_start_loc=torch.tensor([0, end - start], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([end], dtype=torch.int32, device=dev),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None], max_query_len=end - start,
            max_seq_len=end, query_start_loc_host=[0, end - start], seq_lens_host=[end],
        )
        if self.prefill_block_m:  # the Triton prefill kernel's tile list
            meta.prefill_tiles = torch.from_numpy(prefill_tiles(np.array([end - start]), self.prefill_block_m)).to(dev)
        return meta

    @torch.inference_mode()
    def _calibrate_kv_scales(self) -> None:
        """An fp8 cache's scales, a (k_scale, v_scale) per layer, from one prefill of a fixed text
        into a temporary cache in the model's dtype: each layer's largest |K| (after RoPE, as
        stored) and |V| map to half of e4m3's 448. Values up to twice the calibration's stay
        finite, and small ones keep e4m3's 3 mantissa bits: with unit scales 43% of SmolLM2's
        layer-0 values of V fell into its subnormals (perplexity +2.2% against +1.3% calibrated,
        docs/BENCHMARKS.md). Every tensor-parallel rank runs it (the forward's all-reduces)."""
        layers = [m for m in self.model.modules() if hasattr(m, "kv_scales")]
        vocab = self.model_config.vocab_size
        ids = [i % vocab for i in self.loaded.tokenizer.encode(KV_CALIBRATION_TEXT)]
        ids = ids[: max(16, len(ids) // 16 * 16)]  # a row count the kernels are compiled for anyway
        n, dev = len(ids), self.device
        blocks = -(-n // self.block_size)
        caches = [torch.zeros(2, blocks, self.kv_heads, self.block_size, self.model_config.head_dim, dtype=self.dtype,
                              device=dev) for _ in layers]
        self.model(torch.tensor(ids, device=dev), torch.arange(n, device=dev), caches, self.one_sequence_meta(0, n))
        for layer, cache in zip(layers, caches):
            amax = cache.flatten(1).abs().amax(dim=1).float().clamp(min=1e-6)
            layer.kv_scales = tuple((amax / (FP8_MAX / 2)).tolist())
        logger.info("fp8 KV cache: scales from %d calibration tokens, k %.3g-%.3g, v %.3g-%.3g", n,
                    min(m.kv_scales[0] for m in layers), max(m.kv_scales[0] for m in layers),
                    min(m.kv_scales[1] for m in layers), max(m.kv_scales[1] for m in layers))

    @property
    def cuda_graphs_enabled(self) -> bool:
        return self.graphs is not None

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self._bytes_per_block()

    def _bytes_per_block(self) -> int:
        """This rank's bytes: its KV heads only."""
        mc = self.model_config
        return replace(mc, num_kv_heads=self.kv_heads).kv_cache_bytes_per_block(self.block_size, self.kv_dtype.itemsize)

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.kv_cache_memory_bytes is not None:
            num = cfg.kv_cache_memory_bytes // self._bytes_per_block()
        elif cfg.num_kv_blocks is not None:
            num = cfg.num_kv_blocks
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Leave room for activations and logits of the largest step.
            reserve = 2 * cfg.max_num_batched_tokens * self.model_config.vocab_size * 4 + 1024**3
            budget = free - total * (1.0 - cfg.gpu_memory_utilization) - reserve
            num = int(budget // self._bytes_per_block())
        else:
            num = CPU_DEFAULT_KV_CACHE_BYTES // self._bytes_per_block()
        if num < 1:
            raise ValueError("not enough memory for a single KV-cache block")
        return int(num)

    def decode_launch(self, num_seqs: int):
        if self.attention.name != "triton":
            return None
        from roseinfer_kernels.launch_table import decode_launch

        mc = self.model_config
        return decode_launch(str(self.dtype).removeprefix("torch."), mc.head_dim, mc.num_heads // mc.num_kv_heads,
                             self.block_size, num_seqs, mc.num_kv_heads, self.num_sms,
                             fp8_cache=self.kv_dtype == torch.float8_e4m3fn)

    # ---- per-request state ----------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request."""
        self.generators.pop(request_id, None)
        self.block_rows.release(request_id)

    def free_device_memory(self) -> None:
        """Drop the KV cache and the captured graphs (the runner cannot step afterwards);
        used when another program must share the GPU, e.g. HF in `roseinfer bench --compare-hf`."""
        self.kv_caches = []
        self.graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def on_preempted(self, seq: Sequence) -> None:
        self.block_rows.release(seq.request_id)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        gen = self.generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.params.seed)
            self.generators[seq.request_id] = gen
        return gen

    # ---- one step ------------------------------------------------------------------------
    def _block_table_row_ids(self, seqs: list[Sequence]) -> torch.Tensor:
        """Rows of `block_rows.table` holding `seqs`' block tables (brought up to date)."""
        return torch.tensor([self.block_rows.row_of(s) for s in seqs], dtype=torch.int64)

    def step_inputs(self, sched: SchedulerOutput) -> StepInputs:
        """The step's per-token and per-sequence inputs on the host, as numpy arrays. The Python
        work is one pass over the scheduled sequences (their new token ids); positions, cache
        slots and offsets are vectorised, so a 2k-token prefill chunk costs what a decode row does."""
        scheduled = sched.scheduled
        n = len(scheduled)
        starts = np.fromiter((s.num_computed_tokens for s in scheduled), np.int64, n)
        query_lens = np.fromiter((s.num_new_tokens for s in scheduled), np.int64, n)
        query_start_loc = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        seq_of_token = np.repeat(np.arange(n), query_lens)
        positions = np.arange(int(query_start_loc[-1])) - query_start_loc[seq_of_token] + starts[seq_of_token]
        rows = np.fromiter((self.block_rows.row_of(s.seq) for s in scheduled), np.int64, n)
        bs = self.block_size
        slots = self.block_rows.table_np[rows[seq_of_token], positions // bs].astype(np.int64) * bs + positions % bs
        ids = np.fromiter(chain.from_iterable(
            s.seq.token_ids[s.num_computed_tokens:s.num_computed_tokens + s.num_new_tokens] for s in scheduled),
            np.int64, len(positions))
        samples = np.fromiter((s.samples_next_token for s in scheduled), bool, n)
        return StepInputs(ids, positions, slots, query_start_loc, starts + query_lens, rows,
                          query_start_loc[1:][samples] - 1)

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        inputs = self.step_inputs(sched)
        block_tables = self.block_rows.gather(torch.from_numpy(inputs.block_table_rows), inputs.num_blocks(self.block_size))
        if self.tp_group is not None:  # the other ranks run the same step on their slices
            self.tp_group.send_step(inputs, block_tables)
        return self.device_inputs(inputs, block_tables)

    def device_inputs(self, inputs: StepInputs, block_tables: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """The step's tensors on this rank's device, and the sampled rows."""
        seq_lens = inputs.seq_lens.tolist()
        query_start_loc = inputs.query_start_loc.tolist()
        max_seq_len = max(seq_lens)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(inputs.slot_mapping).to(dev, non_blocking=True),
            query_start_loc=torch.from_numpy(inputs.query_start_loc.astype(np.int32)).to(dev, non_blocking=True),
            seq_lens=torch.from_numpy(inputs.seq_lens.astype(np.int32)).to(dev, non_blocking=True),
            block_tables=block_tables.to(dev, non_blocking=True),
            max_query_len=int(np.diff(inputs.query_start_loc).max()),
            max_seq_len=max_seq_len,
            query_start_loc_host=query_start_loc,
            seq_lens_host=seq_lens,
        )
        if meta.is_decode_only:
            meta.decode_launch = self.decode_launch(len(seq_lens))
        elif self.prefill_block_m:
            tiles = prefill_tiles(np.diff(inputs.query_start_loc), self.prefill_block_m)
            meta.prefill_tiles = torch.from_numpy(tiles).to(dev, non_blocking=True)
        ids = torch.from_numpy(inputs.input_ids).to(dev, non_blocking=True)
        pos = torch.from_numpy(inputs.positions).to(dev, non_blocking=True)
        return ids, pos, meta, inputs.logits_indices.tolist()

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        params = [s.params for s in seqs]
        batch = SamplingBatch(
            params=params,
            generators=[self._generator(s) for s in seqs],
            eos_token_ids=self.model_config.eos_token_ids,
        )
        if self.graphs is not None and self.graphs.sampling_kernel:
            # Eager steps (seeded rows, a prompt's first token) draw as the sampling graphs of the
            # nearest captured batch size do.
            graphs, n = self.graphs, len(seqs)
            size = graphs.padded_size(n) if graphs.fits(n) else graphs.batch_sizes[-1]
            batch.kernel = graphs.sampling_kernel.get((size, sampling_variant(params, self.model_config.vocab_size)))
        if any(p.uses_penalties or p.min_tokens for p in params):
            batch.prompt_token_ids = [s.prompt_token_ids for s in seqs]
            batch.output_token_ids = [s.output_token_ids for s in seqs]
        return batch

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, bitmask_filler: Callable[[], torch.Tensor] | None = None
                ) -> list[SampledToken]:
        """Run one step; return a token for each sequence whose prompt (or decode) completed.
        `bitmask_filler` (constrained decoding) gives the allowed-token bitmask, a row per sampling
        sequence in schedule order (unconstrained rows all ones); it is called once the forward
        pass is launched, so on a GPU the grammar's host work overlaps it."""
        sampling_seqs = [s.seq for s in sched.scheduled if s.samples_next_token]
        decode_only = len(sampling_seqs) == len(sched.scheduled) and all(s.num_new_tokens == 1 for s in sched.scheduled)
        if decode_only and self.graphs is not None and self.graphs.fits(len(sampling_seqs)):
            logits = self.graphs.run_decode(sampling_seqs)
        elif self.mixed_graphs is not None and self.mixed_graphs.fits(sched):
            hidden = self.mixed_graphs.run(self.step_inputs(sched))
            if not sampling_seqs:
                return []
            logits = self.model.compute_logits(hidden)
        else:
            input_ids, positions, meta, logits_indices = self.prepare(sched)
            try:
                hidden = self.model(input_ids, positions, self.kv_caches, meta)
                if not sampling_seqs:
                    return []
                logits = self.model.compute_logits(hidden[torch.tensor(logits_indices, device=self.device)])
            except RuntimeError as exc:
                if self.tp_group is None:
                    raise
                raise self.tp_group.guard(exc) from exc
        batch = self.sampling_batch(sampling_seqs)
        if bitmask_filler is not None:
            batch.allowed_token_bitmask = bitmask_filler()
        return self._to_host(sampling_seqs, sample(logits, batch))

    @torch.inference_mode()
    def warm_up_token_mask(self) -> None:
        """Compile constrained sampling's mask kernel before the first constrained request."""
        vocab = self.model_config.vocab_size
        batch = SamplingBatch([SamplingParams(temperature=0.0)], [None],
                              allowed_token_bitmask=torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32))
        sample(torch.zeros(1, vocab, device=self.device), batch)

    @torch.inference_mode()
    def forward_step(self, inputs: StepInputs, block_tables: torch.Tensor) -> None:
        """A tensor-parallel worker's step: the forward over this rank's slices (its all-reduces and
        logits gather meet rank 0's); rank 0 samples."""
        input_ids, positions, meta, logits_indices = self.device_inputs(inputs, block_tables)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if logits_indices:
            self.model.compute_logits(hidden[torch.tensor(logits_indices, device=self.device)])

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one rank)."""
        if self.tp_group is not None:
            self.tp_group.close()

    def can_launch_pipelined_run(self, seqs: list[Sequence], num_steps: int) -> bool:
        """Whether `launch_pipelined_run` serves this batch: the captured graphs cover exactly
        `num_steps` steps, no row has a logit bias, and every row is greedy (one multi-step graph)
        or, where the decoder samples in graphs, no row has a seed (its own generator)."""
        if self.graphs is None or not self.graphs.fits(len(seqs)) or num_steps != self.graphs.multi_steps:
            return False
        if any(s.params.logit_bias for s in seqs):
            return False
        return self.graphs_pick_tokens([s.params for s in seqs])

    def graphs_pick_tokens(self, params: list[SamplingParams]) -> bool:
        """Whether captured graphs can pick these rows' tokens: all greedy (the argmax), or, where
        the decoder samples in graphs, no row seeded (a seed is a generator of its own)."""
        return all(p.greedy for p in params) or (self.graphs.samples_in_graphs and all(p.seed is None for p in params))

    @torch.inference_mode()
    def launch_pipelined_run(self, seqs: list[Sequence], chained: bool) -> PendingTokens:
        """Start one multi-step run on the graphs (greedy: one replay; sampled: the forward and
        sampling graphs in turn) and return without waiting for it.

        `chained=True` continues the previous run of the same batch on the device: its last
        tokens are already the inputs, and positions advance by one run; the host need not
        have read that run's tokens yet. Blocks for every token of the run must be allocated.
        """
        assert self.graphs is not None
        if all(s.params.greedy for s in seqs):
            return self.graphs.launch_greedy_steps(seqs, chained)
        return self.graphs.launch_sampled_steps(seqs, chained)

    @torch.inference_mode()
    def execute_decode_steps(self, seqs: list[Sequence], num_steps: int) -> list[list[int]]:
        """Run `num_steps` decode steps back to back on the device, feeding each step's
        tokens to the next without a host round trip; one sync at the end. Blocks for all the new
        tokens must already be allocated. Returns the tokens of each step, per step. (Batches that
        `can_launch_pipelined_run` serves go through `launch_pipelined_run` instead; batches
        with constrained rows through `launch_grammar_run`.)"""
        assert self.graphs is not None and self.graphs.fits(len(seqs))
        batch = self.sampling_batch(seqs)
        steps = []
        tokens = None
        for i in range(num_steps):
            logits = self.graphs.run_decode(seqs, offset=i, device_input_ids=tokens, num_steps=num_steps)
            tokens = sample(logits, batch).token_ids
            steps.append(tokens)
        return torch.stack(steps).tolist()

    @torch.inference_mode()
    def launch_grammar_run(self, seqs: list[Sequence], num_steps: int, grammar) -> GrammarRun:
        """Start a multi-step run of a batch with constrained rows (its first forward is queued on
        return); `GrammarRun.finish` runs the steps. Blocks for all its tokens must be allocated."""
        assert self.graphs is not None and self.graphs.fits(len(seqs))
        return GrammarRun(self, seqs, num_steps, grammar)

    @staticmethod
    def _to_host(seqs: list[Sequence], out: SamplerOutput) -> list[SampledToken]:
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        top = None
        if out.top_logprobs is not None and out.top_token_ids is not None:
            top = (out.top_token_ids.tolist(), out.top_logprobs.tolist())
        result = []
        for i, seq in enumerate(seqs):
            tok = SampledToken(seq, token_ids[i])
            if logprobs is not None and seq.params.logprobs is not None:
                tok.logprob = logprobs[i]
                if top is not None:
                    k = seq.params.logprobs
                    tok.top_logprobs = list(zip(top[0][i][:k], top[1][i][:k]))
            result.append(tok)
        return result


@dataclass
class PendingTokens:
    """Tokens of a launched multi-step run, on their way to pinned host memory."""

    host: torch.Tensor  # [num_steps, num_seqs] int64, pinned
    started: torch.cuda.Event  # reached when the device starts this run (after earlier work)
    done: torch.cuda.Event
    gpu_s: float = 0.0  # device time of the run, known after wait()

    def wait(self) -> list[list[int]]:
        """Block until the run and its copy finished; the tokens of each step, per step."""
        self.done.synchronize()
        self.gpu_s = self.started.elapsed_time(self.done) / 1e3
        return self.host.tolist()


def compile_manifest_key(config: EngineConfig) -> str:
    """What a compile manifest's entries are recorded under (roseinfer_kernels.precompile): the model and
    the settings that pick kernel specialisations (dtypes, quantization, tensor parallel)."""
    name = os.path.basename(config.model.rstrip("/")) or config.model
    return (f"{name} dtype={config.dtype} quantization={config.quantization} kv={config.kv_cache_dtype} "
            f"tp={config.tensor_parallel_size}")


class GrammarRun:
    """A multi-step decode run whose batch has constrained rows (engine.structured_output.
    GrammarSteps): the host masks each step's sampling with the grammar's bitmask and feeds each
    step's tokens back to the matchers, while the device already runs the next step's forward.

    `finish(chain=True)` also starts the next run of the same batch before it returns: that run's
    first forward on this run's last tokens (on the masked-step graphs, queued right behind the
    last masked sample, before the host waits for it), then (once the matchers have taken them)
    its first masked sample and its second forward, so the device has about two steps of work
    while the host processes this run's outputs (as chained greedy runs do). `ahead`: tokens the
    host has not yet appended to the sequences when the run starts (a chained run's: its
    predecessor's, whose sampling set-up it keeps)."""

    def __init__(self, runner: ModelRunner, seqs: list[Sequence], num_steps: int, grammar,
                 ahead: int = 0, first_ids: torch.Tensor | None = None, predecessor: GrammarRun | None = None) -> None:
        self.runner, self.seqs, self.num_steps, self.grammar = runner, seqs, num_steps, grammar
        self.cuda = runner.device.type == "cuda"
        # Looked up once: current_stream() was most of each step's event record (py-spy).
        self.stream = torch.cuda.current_stream() if self.cuda else None
        self.host = torch.empty(num_steps, len(seqs), dtype=torch.int64, pin_memory=self.cuda)
        graphs = runner.graphs
        # A successor on the masked-step graphs: its predecessor's last masked step left this
        # run's first inputs in the graphs' buffers (and uploaded its block tables first).
        inputs_on_device = predecessor is not None and predecessor.graph_steps
        if inputs_on_device:
            self.logits = graphs.replay_decode(len(seqs))
        else:
            self.logits = graphs.run_decode(seqs, device_input_ids=first_ids, num_steps=num_steps, ahead=ahead)
        if predecessor is not None:  # the same rows: their sampling parameters are on the device already
            self.batch, self.graph_steps, self.sampling = predecessor.batch, predecessor.graph_steps, predecessor.sampling
        else:
            self.batch = b = runner.sampling_batch(seqs)
            # Rows without penalties, biases or log-probabilities, greedy or (where the decoder
            # samples in graphs) unseeded: each step is one upload of the bitmask and two graph
            # replays (the masked argmax or sample with the next inputs, then the forward).
            params = [s.params for s in seqs]
            self.graph_steps = (bool(graphs.grammar_graphs) and not b.needs_processing and b.max_logprobs is None
                                and runner.graphs_pick_tokens(params))
            self.sampling: int | None = None  # None: argmax; else the sampling variant (engine.sampler)
            if self.graph_steps and not b.all_greedy:
                self.sampling = graphs.set_row_params(params)
        if self.graph_steps and not inputs_on_device:
            graphs.start_grammar_steps(len(seqs))
        self.launched = 0  # steps whose sampling is on the device
        self.sampled: list[torch.cuda.Event | None] = []
        self.tokens: torch.Tensor | None = None  # the last launched step's tokens, on the device
        self.chain = False  # finish's: start the next run of this batch,
        self.next_steps = num_steps  # of this many steps
        self.next: GrammarRun | None = None

    def _successor(self) -> GrammarRun:
        """The next run of this batch (`next_steps` steps), its first forward queued on this run's
        last tokens (the grammar side follows once the matchers have taken them)."""
        return GrammarRun(self.runner, self.seqs, self.next_steps, None, self.num_steps, self.tokens, predecessor=self)

    def _launch(self, i: int, previous: list[int] | None = None, bitmask: torch.Tensor | None = None) -> None:
        """Step i's masked sampling (its forward is queued), then step i + 1's forward. `previous`:
        step i - 1's tokens, which the matchers take first (slice by slice, overlapping the fill);
        `bitmask`: step i's, filled already (a chained run's first step)."""
        if bitmask is None:
            bitmask = self.grammar.fill(previous)  # while the device runs step i's forward
        last = i + 1 == self.num_steps
        if self.graph_steps:
            graphs = self.runner.graphs
            # A chained run's last masked step also derives the next run's first inputs, so the
            # device goes on to that forward without the host staging it (one upload and four
            # copies fewer a run; within noise on the H200's seed workload); the next run's blocks
            # must be in the device's tables first.
            successor_inputs = last and self.chain
            if successor_inputs:
                graphs.upload_block_tables_through(self.seqs, self.num_steps + self.next_steps)
            self.tokens = graphs.masked_step(bitmask, last and not successor_inputs, self.sampling)
        else:
            self.batch.allowed_token_bitmask = bitmask
            self.tokens = sample(self.logits, self.batch).token_ids
        self.host[i].copy_(self.tokens, non_blocking=self.cuda)
        event = torch.cuda.Event() if self.cuda else None
        if event is not None:
            event.record(self.stream)
        self.sampled.append(event)
        if not last:  # queued before the host waits for step i's tokens
            if self.graph_steps:
                self.logits = self.runner.graphs.replay_decode(len(self.seqs))
            else:
                self.logits = self.runner.graphs.run_decode(self.seqs, offset=i + 1, device_input_ids=self.tokens,
                                                            num_steps=self.num_steps)
        elif self.chain and self.graph_steps:
            # The next run's first forward needs nothing from the host: queue it now, or the device
            # idles while the host syncs and launches it (~0.5 ms a run under py-spy).
            self.next = self._successor()
        self.launched = i + 1

    @torch.inference_mode()
    def finish(self, chain: bool = False, next_steps: int | None = None) -> list[list[int]]:
        """Every step of the run; its tokens, per step. `chain`: start the next run of the batch,
        of `next_steps` steps (default: as many as this one), whose blocks are allocated."""
        self.chain = chain
        self.next_steps = next_steps or self.num_steps
        previous = None  # the last step's tokens, until the matchers take them
        for i in range(self.num_steps):
            if i >= self.launched:  # (a chained run's first step was launched with its predecessor)
                self._launch(i, previous)
            if self.sampled[i] is not None:
                self.sampled[i].synchronize()
            if i + 1 == self.num_steps and chain and self.next is None:
                # Off the masked-step graphs, the next run's first forward only now: its inputs are
                # staged in the pinned buffers this run's per-step uploads read, which the sync
                # above has drained.
                self.next = self._successor()
            previous = self.host[i].tolist()
        if self.next is None:
            self.grammar.accept(previous)
        else:  # the matchers take our last tokens and fill the next run's first mask in one go
            bitmask = self.grammar.fill(previous)  # (a row ending here is counted in this run's `ends`)
            self.next.grammar = self.grammar.continued()
            self.next._launch(0, bitmask=bitmask)  # its first masked sample and second forward, before our outputs are read
        return self.host.tolist()


# Cascade decode graphs (greedy runs whose rows share a prompt prefix in the same cache blocks):
# captured for batches of at least CASCADE_MIN_BATCH rows, replayed when rows x shared prefix
# tokens reach CASCADE_MIN_SHARED_TOKENS. Below that the prefix kernel's extra launch costs more
# than reading the prefix once saves: on the H200 (scripts/decode_attention_bw.py --sweep, GPT-2,
# 64 tokens past the prefix) cascade took 0.81x paged_decode's time at batch 128 with a 256-token
# prefix and 0.88x at 64 x 512, but 0.98x at 128 x 128 and 1.12x at 64 x 256 (docs/BENCHMARKS.md).
CASCADE_MIN_BATCH = 32
CASCADE_MIN_SHARED_TOKENS = 32768


def shared_prefix_tokens(tables: np.ndarray, num_tokens: list[int], block_size: int) -> int:
    """Tokens at the start of every row's context that sit in the same cache blocks (`tables`:
    the rows' block tables, [rows, blocks]; `num_tokens`: each row's tokens, the newest of which
    the coming step writes): whole blocks, all filled before that newest token. What cascade
    decoding reads once for the batch; 0 for a single row."""
    if len(num_tokens) < 2:
        return 0
    filled = (min(num_tokens) - 1) // block_size
    if filled <= 0:
        return 0
    head = tables[:, :filled]
    same = (head == head[0]).all(axis=0)
    return (filled if same.all() else int(same.argmin())) * block_size


# Greedy multi-step runs replay one captured graph of all num_scheduler_steps forwards (and their
# argmaxes) when a forward is short, where launching a graph a step would show; a model whose
# largest batch's forward takes at least this long (timed once, at capture) replays each step's
# forward graph and a small argmax graph instead, as sampled runs do (two graph launches a step
# and the forward's fp32 logits: estimated well under 1% of an 8B's step; `scripts/gpu_suite.sh
# stepgraphs` measures it). Its capture then records one forward per batch size rather than
# num_scheduler_steps + 1 (and the cascade graphs one rather than num_scheduler_steps): seconds of
# an 8B's start (issue 11's ready time).
# (2 ms: reading an 8B's weights alone takes ~3.7 ms at the H200's copy rate, a 1B's ~0.6 ms, GPT-2's
# 0.06 ms: far from the threshold, so a model's choice does not flip from start to start.)
GREEDY_STEP_GRAPHS_MIN_FORWARD_S = 2e-3


class CudaGraphDecoder:
    """The decode step (one token per sequence -> logits) captured once per batch size.

    Inputs live in static device buffers; a batch is padded to the next
    captured size with rows whose slot is -1 (no cache write) and whose
    sequence length is 0 (attention returns zeros).
    """

    def __init__(self, runner: ModelRunner, batch_sizes: list[int], pool=None) -> None:
        self.runner = runner
        self.pool = pool  # a memory pool to share (the mixed-step graphs'), else the first graph's
        self.batch_sizes = sorted(set(batch_sizes))
        dev = runner.device
        max_bs = self.batch_sizes[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(max_bs, runner.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        # Host staging (ids, positions, slots, seq_lens), one per step of a multi-step decode (a
        # constrained run's may be longer than the others): an upload may still be in flight when
        # the next step's inputs are written.
        self.staging = torch.zeros(max(1, runner.config.max_constrained_run_steps), 4, max_bs, dtype=torch.int64,
                                   pin_memory=True)
        self.staging_np = self.staging.numpy()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        # Greedy multi-step decode: `multi_steps` whole decode steps in one graph (none captured
        # with greedy_step_graphs), each step's argmax feeding the next, positions/slots/lengths
        # derived on the device.
        self.multi_steps = runner.config.num_scheduler_steps
        self.base_pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.active = torch.zeros(max_bs, dtype=torch.bool, device=dev)
        self.multi_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.step_inputs_kernel = None
        if runner.attention.name == "triton":
            from roseinfer_kernels.decode_step import decode_step_inputs

            self.step_inputs_kernel = decode_step_inputs
        self.multi_tokens: dict[int, torch.Tensor] = {}
        # Two pinned buffers each for a run's tokens (read while the next run is in flight) and
        # its block tables (a pageable upload would wait for the run in flight to finish).
        self.host_tokens = [torch.zeros(max(1, self.multi_steps), max_bs, dtype=torch.int64, pin_memory=True)
                            for _ in range(2)]
        self.host_tables = [torch.zeros(max_bs, runner.max_blocks_per_seq, dtype=torch.int32, pin_memory=True)
                            for _ in range(2)]
        self.next_host_buffer = 0
        # Constrained runs (GrammarRun): a step's masked argmax (or sample, see row_params below) and
        # the next step's inputs, derived on the device, as small graphs per batch size and
        # sampling variant, so that between two forward replays the host only fills and uploads the
        # bitmask. `grammar_pos` is the position of the step whose forward comes next (the pipelined
        # runs' `base_pos` stays theirs).
        self.grammar_graphs: dict[tuple[int, bool | None], tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]] = {}
        if self.step_inputs_kernel is not None:
            words = (runner.model_config.vocab_size + 31) // 32
            self.grammar_bitmask = torch.full((max_bs, words), -1, dtype=torch.int32, device=dev)
            self.grammar_tokens = torch.zeros(max_bs, dtype=torch.int64, device=dev)
            self.grammar_pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
            self.grammar_active = torch.zeros(max_bs, dtype=torch.bool, device=dev)
        self.grammar_steps_replayed = 0  # for tests
        # Sampled multi-step runs: the forward graph, then a captured sampling step, replayed in
        # turn; the rows' sampling parameters sit in `row_params` (greedy, temperature, top_k,
        # top_p, min_p), set when a run starts. Two variants: temperature only, and with the
        # filters. A sampling step writes its tokens at the device-side step index `sample_step`
        # and the next forward's inputs from `sample_pos`, so two graphs per batch size and variant
        # serve every step (a step before another, a run's last step) rather than one per step
        # index, which had made the capture of the 8B's graphs seconds longer.
        self.sample_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]] = {}
        # How the sampling graphs draw at each batch size and variant: torch's sort and softmax or
        # the sampling kernel, measured here once (engine.sampler.sampling_kernels).
        self.sampling_kernel: dict[tuple[int, int], object] = {}
        if self.multi_steps > 1 and self.step_inputs_kernel is not None:
            self.sampling_kernel = sampling_kernels(dev, runner.model_config.vocab_size, self.batch_sizes)
            self.row_params = torch.ones(5, max_bs, dtype=torch.float32, device=dev)
            self.row_params_host = torch.ones(5, max_bs, dtype=torch.float32, pin_memory=True)
            self.sampled_tokens = torch.zeros(self.multi_steps, max_bs, dtype=torch.int64, device=dev)
            self.sample_step = torch.zeros(1, dtype=torch.int64, device=dev)
            self.sample_pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.sampled_runs = 0  # for tests
        # Greedy runs whose rows share a prompt prefix in the same cache blocks (the prefix cache
        # leaves a common system prompt so): a second multi-step graph per batch size whose
        # attention reads that prefix once per KV head for all rows (cascade_decode), its length
        # in `shared_prefix_len`, set when a run starts; runs chained to it keep it.
        # With greedy_step_graphs, a cascade graph is one forward (its logits in cascade_logits),
        # followed each step by an argmax graph of cascade_step_graphs, as sampled steps are.
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_tokens: dict[int, torch.Tensor] = {}
        self.cascade_logits: dict[int, torch.Tensor] = {}
        self.cascade_step_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]] = {}
        self.greedy_step_graphs = False  # decided in _capture (GREEDY_STEP_GRAPHS_MIN_FORWARD_S)
        self.shared_prefix_len = torch.zeros(1, dtype=torch.int32, device=dev)
        self.cascade_run = False
        self.cascade_runs = 0  # for tests
        self._capture()

    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.batch_sizes[-1]

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=self.runner.max_model_len, query_start_loc_host=[], seq_lens_host=[0] * bs,
            decode_launch=self.runner.decode_launch(bs),
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = self.pool
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        self.capture_seconds = {}  # per kind of graph, for the log: where a model's load time goes
        with torch.cuda.stream(stream):
            for bs in reversed(self.batch_sizes):
                meta = self._meta(bs)
                # (the first forward compiles the kernels, the second settles the allocator)
                self.graphs[bs], self.logits[bs] = self._warm_and_capture(
                    lambda: self._forward_body(bs, meta), pool, stream, "forward", warm_runs=2)
                pool = self.graphs[bs].pool()
                if bs == self.batch_sizes[-1] and self.multi_steps > 1 and self.step_inputs_kernel is not None:
                    forward_s = self._replay_seconds(self.graphs[bs], stream)
                    self.greedy_step_graphs = forward_s >= GREEDY_STEP_GRAPHS_MIN_FORWARD_S
                    logger.info("decode forward at batch %d: %.2f ms; greedy runs replay %s", bs, forward_s * 1e3,
                                "a forward and an argmax graph a step" if self.greedy_step_graphs else "one graph a run")
                if self.multi_steps > 1:
                    cascade_meta = replace(meta, shared_prefix_len=self.shared_prefix_len)
                    if not self.greedy_step_graphs:
                        self.multi_graphs[bs], self.multi_tokens[bs] = self._warm_and_capture(
                            lambda: self._decode_steps_body(bs, meta), pool, stream, "multi-step")
                        if self._captures_cascade(bs):
                            self.cascade_graphs[bs], self.cascade_tokens[bs] = self._warm_and_capture(
                                lambda: self._decode_steps_body(bs, cascade_meta), pool, stream, "cascade")
                    elif self._captures_cascade(bs):
                        self.cascade_graphs[bs], self.cascade_logits[bs] = self._warm_and_capture(
                            lambda: self._forward_body(bs, cascade_meta), pool, stream, "cascade")
                        self.sample_step.zero_()  # each warm run of a step before another advances it
                        self.cascade_step_graphs[bs] = self._capture_step_pair(
                            self._sample_step_body, pool, stream, "sampling", bs=bs, variant=None,
                            logits=self.cascade_logits[bs])
                    if self.step_inputs_kernel is not None:
                        # variant None: the argmax step of greedy runs, when they replay one a step
                        for variant in ((None,) if self.greedy_step_graphs else ()) + tuple(SAMPLING_VARIANTS):
                            self.sample_step.zero_()
                            self.sample_graphs[(bs, variant)] = self._capture_step_pair(
                                self._sample_step_body, pool, stream, "sampling", bs=bs, variant=variant)
                if self.step_inputs_kernel is not None:
                    for sampling in ((None, *SAMPLING_VARIANTS) if self.multi_steps > 1 else (None,)):
                        self.grammar_graphs[(bs, sampling)] = self._capture_step_pair(
                            self._masked_step_body, pool, stream, "masked", bs=bs, sampling=sampling)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s (%s)", self.batch_sizes,
                    ", ".join(f"{kind} {sec:.2f} s" for kind, sec in self.capture_seconds.items()))

    def _captures_cascade(self, bs: int) -> bool:
        config = self.runner.config
        return (self.step_inputs_kernel is not None and config.cascade_attention and config.enable_prefix_caching
                and bs >= CASCADE_MIN_BATCH)

    def _warm_and_capture(self, body, pool, stream, kind: str, warm_runs: int = 1) -> tuple[torch.cuda.CUDAGraph, object]:
        """Run `body` outside a graph (compiling its kernels, settling the allocator), then capture
        it; the graph and what the captured call returned (its static outputs). The time (the warm
        runs included: the capture waits for them) adds to capture_seconds[kind]."""
        start = time.perf_counter()
        for _ in range(warm_runs):
            body()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = body()
        self.capture_seconds[kind] = self.capture_seconds.get(kind, 0.0) + time.perf_counter() - start
        return graph, out

    def _capture_step_pair(self, body, pool, stream, kind: str, **args) -> tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]:
        """A step's two graphs of `body(next_inputs=..., **args)`: before another step (the next
        forward's inputs derived too), and a run's last step."""
        return tuple(self._warm_and_capture(lambda n=next_inputs: body(next_inputs=n, **args), pool, stream, kind)[0]
                     for next_inputs in (True, False))

    def _forward_body(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        """One decode forward of the static inputs' first `bs` rows; the logits."""
        model = self.runner.model
        return model.compute_logits(model(self.input_ids[:bs], self.positions[:bs], self.runner.kv_caches, meta))

    @staticmethod
    def _replay_seconds(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, replays: int = 3) -> float:
        """A graph's time on the device, after one replay to warm up (on the capture's static inputs)."""
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(replays):
            graph.replay()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / replays

    def padded_size(self, n: int) -> int:
        """The captured batch size a batch of `n` rows replays (padding rows past n)."""
        return next(b for b in self.batch_sizes if b >= n)

    def _decode_steps_body(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        model, caches, block = self.runner.model, self.runner.kv_caches, self.runner.block_size
        active = self.active[:bs]
        tokens = []
        for i in range(self.multi_steps):
            if self.step_inputs_kernel is not None:  # one launch instead of a dozen
                self._derive_step_inputs(bs, i)
            else:
                pos = self.base_pos[:bs] + i
                self.positions[:bs].copy_(pos)
                self.seq_lens[:bs].copy_(torch.where(active, pos + 1, 0))
                block_ids = self.block_tables[:bs].gather(1, (pos // block).unsqueeze(1)).squeeze(1)
                self.slot_mapping[:bs].copy_(torch.where(active, block_ids * block + pos % block, -1))
            hidden = model(self.input_ids[:bs], self.positions[:bs], caches, meta)
            next_ids = model.compute_logits(hidden, upcast=False).argmax(dim=-1)
            tokens.append(next_ids)
            self.input_ids[:bs].copy_(next_ids)
        return torch.stack(tokens)

    def _derive_step_inputs(self, bs: int, step: int, base_pos: torch.Tensor | None = None,
                            active: torch.Tensor | None = None) -> None:
        """The next forward's positions, lengths and cache slots, on the device: `step` past each
        row's base position (the pipelined runs' `base_pos` and `active` unless given)."""
        base_pos = self.base_pos if base_pos is None else base_pos
        active = self.active if active is None else active
        self.step_inputs_kernel(base_pos[:bs], active[:bs], self.block_tables[:bs], step, self.runner.block_size,
                                self.positions[:bs], self.seq_lens[:bs], self.slot_mapping[:bs])

    def _sample_step_body(self, bs: int, variant: int | None, next_inputs: bool, logits: torch.Tensor | None = None) -> None:
        """Sample a step's tokens from the decode graph's logits (or `logits`) with the rows'
        parameters (the filters of sampling variant `variant`; None: the argmax) into
        `sampled_tokens[sample_step]` and `input_ids`; with `next_inputs` (not the run's last
        step), also advance `sample_step` and `sample_pos` and derive the next forward's position,
        length and cache slot."""
        ids = self._pick_tokens(bs, self.logits[bs] if logits is None else logits, variant)
        self.sampled_tokens[:, :bs].index_copy_(0, self.sample_step, ids.unsqueeze(0))
        self.input_ids[:bs].copy_(ids)
        if next_inputs:
            self.sample_step.add_(1)
            self.sample_pos[:bs].add_(1)
            self._derive_step_inputs(bs, 0, self.sample_pos)

    def _pick_tokens(self, bs: int, logits: torch.Tensor, sampling: int | None) -> torch.Tensor:
        """Each row's token: the argmax (`sampling` None), or sampled with `row_params` and the
        filters of sampling variant `sampling` (engine.sampler.SAMPLING_VARIANTS)."""
        if sampling is None:
            return logits.argmax(dim=-1)
        params = self.row_params[:, :bs]
        noise = torch.empty_like(logits).exponential_()
        top_k = params[2].long() if sampling == TOP_K else None
        top_p, min_p = (params[3], params[4]) if sampling != PLAIN else (None, None)
        return sample_rows(logits, params[0] > 0.5, params[1], top_k, top_p, min_p, noise,
                           self.sampling_kernel.get((bs, sampling)))

    def _masked_step_body(self, bs: int, next_inputs: bool, sampling: int | None) -> None:
        """The decode graph's logits masked by `grammar_bitmask`, their token (_pick_tokens) into
        `grammar_tokens`; with `next_inputs`, also the next forward's ids, position, length and
        cache slot."""
        from roseinfer_kernels.token_bitmask import mask_logits_

        ids = self._pick_tokens(bs, mask_logits_(self.logits[bs], self.grammar_bitmask[:bs]), sampling)
        self.grammar_tokens[:bs].copy_(ids)
        if next_inputs:
            self.input_ids[:bs].copy_(ids)
            self.grammar_pos[:bs].add_(1)
            self._derive_step_inputs(bs, 0, self.grammar_pos, self.grammar_active)

    def start_grammar_steps(self, n: int) -> None:
        """After `run_decode` queued a run's first forward: the device-side step counter starts at
        that forward's positions (padding rows inactive)."""
        bs = self.padded_size(n)
        self.grammar_pos[:bs].copy_(self.positions[:bs])
        self.grammar_active[:bs].copy_(self.seq_lens[:bs] > 0)

    def masked_step(self, bitmask: torch.Tensor, last: bool, sampling: int | None) -> torch.Tensor:
        """Upload a step's bitmask [n, words] (pinned) and replay its masked argmax (`sampling` None)
        or sample (with the parameters `set_row_params` set); unless `last`, the next forward's
        inputs are set on the device too (`replay_decode` then runs it). Returns the step's tokens
        [n] (a static buffer: read it before the next step)."""
        n = bitmask.shape[0]
        bs = self.padded_size(n)
        self.grammar_bitmask[:n].copy_(bitmask, non_blocking=True)
        self.grammar_graphs[(bs, sampling)][1 if last else 0].replay()
        self.grammar_steps_replayed += 1
        return self.grammar_tokens[:n]

    def replay_decode(self, n: int) -> torch.Tensor:
        """The decode graph on the inputs already in the static buffers; logits [n, vocab]."""
        bs = self.padded_size(n)
        self.graphs[bs].replay()
        return self.logits[bs][:n]

    @property
    def samples_in_graphs(self) -> bool:
        """Whether sampled multi-step runs replay captured sampling steps (launch_sampled_steps)."""
        return bool(self.sample_graphs)

    def launch_greedy_steps(self, seqs: list[Sequence], chained: bool) -> PendingTokens:
        """`multi_steps` greedy decode steps in one graph replay (with `greedy_step_graphs`, a
        forward and an argmax graph a step); the tokens land in pinned host memory asynchronously.
        `chained`: continue the previous replay of this same batch, whose last tokens the graph
        left in `input_ids`; its tokens need not have been read yet."""
        return self._launch_steps(seqs, chained, None)

    def launch_sampled_steps(self, seqs: list[Sequence], chained: bool) -> PendingTokens:
        """`multi_steps` sampled decode steps (rows without a seed, bias or penalty; greedy rows
        allowed): each the forward graph, then the step's captured sampling graph, so the host only
        replays graphs; chained as greedy runs are."""
        params = [s.params for s in seqs]
        if chained:  # a chained run keeps its batch's parameters
            variant = self._variant(params)
        else:
            variant = self.set_row_params(params)
        self.sampled_runs += 1
        return self._launch_steps(seqs, chained, variant)

    def _variant(self, params: list[SamplingParams]) -> int:
        return sampling_variant(params, self.runner.model_config.vocab_size)

    def set_row_params(self, params: list[SamplingParams]) -> int:
        """Upload the rows' sampling parameters for the sampling graphs (padding rows greedy);
        returns the sampling variant they need. The previous upload has been consumed: a
        new batch starts after the last one's tokens were read."""
        vocab = self.runner.model_config.vocab_size
        host = self.row_params_host.numpy()
        host[:, :] = 1.0  # padding rows: greedy
        n = len(params)
        for i, values in enumerate(row_sampling_values(params, vocab).values()):  # the rows of row_params
            host[i, :n] = values
        host[2, n:] = vocab
        host[4, n:] = 0.0
        self.row_params.copy_(self.row_params_host, non_blocking=True)
        return self._variant(params)

    def _launch_steps(self, seqs: list[Sequence], chained: bool, variant: int | None) -> PendingTokens:
        """A greedy run's one graph (`variant` None) or a sampled run's forward and sampling graphs
        (of that sampling variant)."""
        n = len(seqs)
        bs = self.padded_size(n)
        if chained:  # one run further on than the host knows
            self.base_pos[:bs].add_(self.multi_steps)
        else:
            pad = bs - n
            ids = [s.token_ids[-1] for s in seqs]
            pos = [s.num_tokens - 1 for s in seqs]
            staging = self.staging[0]
            staging[:3, :bs] = torch.tensor([ids + [0] * pad, pos + [0] * pad, [1] * n + [0] * pad])
            dev_staging = staging[:3, :bs].to(self.runner.device, non_blocking=True)
            self.input_ids[:bs].copy_(dev_staging[0])
            self.base_pos[:bs].copy_(dev_staging[1])
            self.active[:bs].copy_(dev_staging[2] != 0)
        rows = self.runner.block_rows
        row_ids = self.runner._block_table_row_ids(seqs)
        if not chained:
            self.cascade_run = variant is None and bs in self.cascade_graphs and self._stage_shared_prefix(seqs, row_ids)
        started = torch.cuda.Event(enable_timing=True)
        started.record()
        buffer = self._upload_block_tables(row_ids, rows.table.shape[1])
        if variant is None and not self.greedy_step_graphs:  # the whole run in one graph
            if self.cascade_run:
                self.cascade_graphs[bs].replay()
                tokens = self.cascade_tokens[bs]
                self.cascade_runs += 1
            else:
                self.multi_graphs[bs].replay()
                tokens = self.multi_tokens[bs]
        else:  # each step a forward graph, then its sampling (or argmax) graph
            self._derive_step_inputs(bs, 0)
            self.sample_step.zero_()
            self.sample_pos[:bs].copy_(self.base_pos[:bs])
            forward = self.graphs[bs]
            before_last, last = self.sample_graphs[(bs, variant)]
            if variant is None and self.cascade_run:
                forward, (before_last, last) = self.cascade_graphs[bs], self.cascade_step_graphs[bs]
                self.cascade_runs += 1
            for step in range(self.multi_steps):
                forward.replay()
                (last if step + 1 == self.multi_steps else before_last).replay()
            tokens = self.sampled_tokens
        host = self.host_tokens[buffer][:, :n]
        host.copy_(tokens[:, :n], non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return PendingTokens(host, started, done)

    def _upload_block_tables(self, row_ids: torch.Tensor, num_blocks: int) -> int:
        """The first `num_blocks` entries of rows `row_ids` into `block_tables`, through the next of
        the two pinned host buffers (a pageable upload would wait for the run in flight); returns
        that buffer's index (a run reads its tokens back into the `host_tokens` of the same one)."""
        buffer = self.next_host_buffer
        self.next_host_buffer ^= 1
        n = row_ids.shape[0]
        tables = self.host_tables[buffer].view(-1)[: n * num_blocks].view(n, num_blocks)
        self.runner.block_rows.gather(row_ids, num_blocks, out=tables)
        self.block_tables[:n, :num_blocks].copy_(tables, non_blocking=True)
        return buffer

    def _stage_shared_prefix(self, seqs: list[Sequence], row_ids: torch.Tensor) -> bool:
        """Whether a greedy run's rows share enough of a prompt prefix for the cascade graphs; if
        so, its length is queued to `shared_prefix_len`."""
        tables = self.runner.block_rows.table_np[row_ids.numpy()]
        tokens = shared_prefix_tokens(tables, [s.num_tokens for s in seqs], self.runner.block_size)
        if tokens * len(seqs) < CASCADE_MIN_SHARED_TOKENS:
            return False
        self.shared_prefix_len.fill_(tokens)
        return True

    def _stage_run(self, seqs: list[Sequence], bs: int, num_steps: int, ahead: int = 0) -> None:
        """Host staging of all `num_steps` steps of a decode run (ids of the first step; positions,
        cache slots and lengths of each), in one numpy pass over the batch: later steps of the run
        then only upload and replay, so the device does not wait on Python between them. `ahead`:
        the run starts that many tokens past what the sequences hold (a chained run)."""
        n = len(seqs)
        block = self.runner.block_size
        rows = self.runner.block_rows
        row_ids = np.fromiter((rows.row_of(s) for s in seqs), np.int64, n)
        positions = np.fromiter((s.num_tokens - 1 + ahead for s in seqs), np.int64, n) + np.arange(num_steps)[:, None]
        staging = self.staging_np[:num_steps, :, :bs]
        staging[:, :, n:] = 0  # padding rows: token 0 at position 0, no cache write (slot -1), length 0
        staging[:, 2, n:] = -1
        staging[0, 0, :n] = np.fromiter((s.token_ids[-1] for s in seqs), np.int64, n)
        staging[1:, 0, :n] = 0  # later steps take their ids from the device
        staging[:, 1, :n] = positions
        staging[:, 2, :n] = rows.table_np[row_ids, positions // block] * block + positions % block
        staging[:, 3, :n] = positions + 1

    def upload_block_tables_through(self, seqs: list[Sequence], steps_ahead: int) -> None:
        """The rows' block tables, as far as the steps up to `steps_ahead` tokens past what the
        host's sequences hold need (a run that derives its inputs on the device)."""
        newest = max(s.num_tokens for s in seqs) - 1 + steps_ahead - 1  # the last step's position
        self._upload_block_tables(self.runner._block_table_row_ids(seqs), newest // self.runner.block_size + 1)

    def run_decode(self, seqs: list[Sequence], offset: int = 0, device_input_ids: torch.Tensor | None = None,
                   num_steps: int = 1, ahead: int = 0) -> torch.Tensor:
        """Logits [len(seqs), vocab] for each sequence's next token.

        offset > 0 runs the step `offset` tokens ahead of what the host knows
        (multi-step decode): token ids then come from `device_input_ids`, and
        the inputs and block tables staged at offset 0 already cover all `num_steps`.
        `ahead` > 0 (at offset 0): the run starts that many tokens past the host's sequences, on
        `device_input_ids` (a run chained onto one whose tokens the host has not read).
        """
        n = len(seqs)
        bs = self.padded_size(n)
        if offset == 0:
            self._stage_run(seqs, bs, num_steps, ahead)
        dev_staging = self.staging[offset, :, :bs].to(self.runner.device, non_blocking=True)
        if device_input_ids is None:
            self.input_ids[:bs].copy_(dev_staging[0])
        else:
            self.input_ids[:n].copy_(device_input_ids[:n])
        self.positions[:bs].copy_(dev_staging[1])
        self.slot_mapping[:bs].copy_(dev_staging[2])
        self.seq_lens[:bs].copy_(dev_staging[3])
        if offset == 0:
            max_blocks = (int(self.staging_np[num_steps - 1, 3, :n].max()) - 1) // self.runner.block_size + 1
            self._upload_block_tables(self.runner._block_table_row_ids(seqs), max_blocks)
        self.graphs[bs].replay()
        return self.logits[bs][:n]


class _MixedStaging:
    """One set of pinned host buffers for a mixed step's uploads (see MixedStepGraphs)."""

    def __init__(self, max_tokens: int, i32_len: int, slots: int, max_blocks: int) -> None:
        self.i64 = torch.zeros(3, max_tokens, dtype=torch.int64, pin_memory=True)
        self.i32 = torch.zeros(i32_len, dtype=torch.int32, pin_memory=True)
        self.i64_np, self.i32_np = self.i64.numpy(), self.i32.numpy()
        self.tables = torch.zeros(slots * max_blocks, dtype=torch.int32, pin_memory=True)
        self.uploaded = torch.cuda.Event()
        self.uploaded.record()  # nothing to wait for yet


MIXED_STEP_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def mixed_step_token_buckets(token_budget: int, max_tokens: int | None) -> list[int]:
    """Token counts to capture mixed-step graphs for: up to the budget (or `max_tokens`, 0 for
    none), in steps of at most 1.5x so that padding costs at most a third of a step."""
    top = token_budget if max_tokens is None else min(token_budget, max_tokens)
    if top <= 0:
        return []
    return sorted({b for b in MIXED_STEP_TOKEN_BUCKETS if b < top} | {top})


class MixedStepGraphs:
    """Steps that carry prompt tokens (prefill chunks alone or beside decodes), captured once per
    token bucket, so that they replay a graph instead of launching ~10 kernels a layer from Python.

    Every input is a static device buffer sized for the largest bucket and `max_num_seqs`
    sequence slots: tokens past the step's are padding (slot -1: no cache write), sequence slots
    past its sequences have no queries and length 0, and attention walks a tile list padded with
    -1, so one graph serves any split of its token count between sequences. The graph ends with
    the final hidden state of each sampled token; the LM head runs after it on those rows only.
    """

    def __init__(self, runner: ModelRunner, token_buckets: list[int]) -> None:
        self.runner = runner
        self.buckets = token_buckets
        self.max_seqs = runner.config.max_num_seqs
        self.block_m = runner.prefill_block_m
        max_tokens, slots = token_buckets[-1], self.max_seqs
        self.max_tiles = max_prefill_tiles(max_tokens, slots, self.block_m)
        # Device buffers, and pinned host staging of the same layout (one upload each):
        #   int64: input ids, positions, slots (one row each, max_tokens wide)
        #   int32: query_start_loc [slots + 1], seq_lens [slots], tiles, logits indices [slots]
        # Two staging sets, used in turn: a step without sampled tokens returns before its uploads
        # ran, and the next step must not overwrite them (each set waits for its last upload).
        i32_len = 2 * slots + 1 + self.max_tiles + slots
        self.staging = [_MixedStaging(max_tokens, i32_len, slots, runner.max_blocks_per_seq) for _ in range(2)]
        self.next_staging = 0
        dev = runner.device
        self.dev_i64 = torch.zeros(3, max_tokens, dtype=torch.int64, device=dev)
        self.dev_i64[2].fill_(-1)
        self.dev_i32 = torch.zeros(i32_len, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(slots, runner.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.input_ids, self.positions, self.slot_mapping = self.dev_i64
        self.query_start_loc, self.seq_lens, self.tiles, self.logits_indices = self._i32_views(self.dev_i32)
        self.tiles.fill_(-1)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.sampled_hidden: dict[int, torch.Tensor] = {}
        self.pool = None
        self.replays = 0  # steps served, for tests and logs
        self._capture()

    def _i32_views(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        slots = self.max_seqs
        return (buf[:slots + 1], buf[slots + 1:2 * slots + 1], buf[2 * slots + 1:2 * slots + 1 + self.max_tiles],
                buf[2 * slots + 1 + self.max_tiles:])

    def fits(self, sched: SchedulerOutput) -> bool:
        return len(sched.scheduled) <= self.max_seqs and sched.num_batched_tokens <= self.buckets[-1]

    def _meta(self, num_tokens: int) -> AttentionMetadata:
        # Only as many tiles as a step of this many tokens can need: the kernel's grid.
        num_tiles = max_prefill_tiles(num_tokens, min(self.max_seqs, num_tokens), self.block_m)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens], query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens, block_tables=self.block_tables,
            max_query_len=num_tokens, max_seq_len=self.runner.max_model_len,  # > 1: the prefill kernel
            query_start_loc_host=[], seq_lens_host=[], prefill_tiles=self.tiles[:num_tiles],
        )

    @torch.inference_mode()
    def _capture(self) -> None:
        model, caches = self.runner.model, self.runner.kv_caches
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for num_tokens in reversed(self.buckets):
                meta = self._meta(num_tokens)
                ids, pos = self.input_ids[:num_tokens], self.positions[:num_tokens]
                # One eager run loads the kernels and lets cuBLAS pick its algorithms for these shapes
                # (neither may happen inside a capture); a second one had nothing left to settle and cost
                # the 8B ~0.8 s of this capture's 2.6 s (H200, docs/BENCHMARKS.md, seventeenth session).
                model(ids, pos, caches, meta).index_select(0, self.logits_indices)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.sampled_hidden[num_tokens] = model(ids, pos, caches, meta).index_select(0, self.logits_indices)
                self.pool = graph.pool()
                self.graphs[num_tokens] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for mixed steps of up to %s tokens", self.buckets)

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Replay the smallest bucket that holds the step; the final hidden state of each sampled
        token, [num_sampled, hidden]."""
        num_tokens, num_seqs = len(inputs.input_ids), len(inputs.seq_lens)
        bucket = next(b for b in self.buckets if b >= num_tokens)
        staging = self.staging[self.next_staging]
        self.next_staging ^= 1
        staging.uploaded.synchronize()
        host = staging.i64_np
        host[0, :num_tokens] = inputs.input_ids
        host[1, :num_tokens] = inputs.positions
        host[2, :num_tokens] = inputs.slot_mapping
        host[:, num_tokens:bucket] = 0
        host[2, num_tokens:bucket] = -1
        qsl, lens, tiles, logits_indices = self._i32_views(staging.i32_np)
        qsl[:num_seqs + 1] = inputs.query_start_loc
        qsl[num_seqs + 1:] = num_tokens
        lens[:num_seqs] = inputs.seq_lens
        lens[num_seqs:] = 0
        prefill_tiles(np.diff(inputs.query_start_loc), self.block_m, out=tiles)
        num_sampled = len(inputs.logits_indices)
        logits_indices[:num_sampled] = inputs.logits_indices
        logits_indices[num_sampled:] = 0
        self.dev_i64.copy_(staging.i64, non_blocking=True)  # whole rows: one contiguous upload
        self.dev_i32.copy_(staging.i32, non_blocking=True)
        max_blocks = inputs.num_blocks(self.runner.block_size)
        # Packed [num_seqs, max_blocks] on the host (contiguous, pinned), then into the wider table.
        packed = staging.tables[:num_seqs * max_blocks].view(num_seqs, max_blocks)
        self.runner.block_rows.gather(torch.from_numpy(inputs.block_table_rows), max_blocks, out=packed)
        self.block_tables[:num_seqs, :max_blocks].copy_(packed, non_blocking=True)
        staging.uploaded.record()
        self.graphs[bucket].replay()
        self.replays += 1
        return self.sampled_hidden[bucket][:num_sampled]


def run_tp_worker(config: EngineConfig, rank: int, port: int, joining=None) -> None:
    """A tensor-parallel worker process (ranks past 0): build this rank's part of the model and
    cache, then run every step rank 0 sends until told to stop. `joining` is set just before it
    joins the group."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if joining is not None:
        joining.set()
    runner = ModelRunner(config, tp_rank=rank, tp_port=port)
    comm = runner.device if runner.device.type == "cuda" else torch.device("cpu")
    while (step := receive_step(comm)) is not None:
        arrays, tables = step
        ids, positions, slots, query_start_loc, seq_lens, sampled = arrays
        inputs = StepInputs(ids, positions, slots, query_start_loc, seq_lens, np.arange(len(seq_lens)), sampled)
        runner.forward_step(inputs, tables)
    torch.distributed.destroy_process_group()
