"""Tensors in, sampled tokens out: input preparation, the paged KV cache, the forward pass.

The runner executes what the scheduler decided; it owns the model, the KV
cache (one preallocated tensor per layer), the per-request RNGs, a host
mirror of the block tables that grows by appended blocks only, and on CUDA
the decode step captured as CUDA graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.attention import AttentionBackend, AttentionMetadata, TorchAttention
from engine.config import EngineConfig
from engine.loader import LoadedModel, load_model
from engine.models.layers import configure_decode_kernels
from engine.sampler import SamplerOutput, SamplingBatch, sample
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 512 * 1024**2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    return device


def make_attention_backend(name: str, device: torch.device, dtype: str = "auto") -> AttentionBackend:
    """`auto` picks the Triton kernels on CUDA; on the CPU the C++ kernels for float32 where they
    build, else plain torch."""
    if name == "auto":
        if device.type == "cuda":
            name = "triton"
        else:
            from kernels.cpu_build import available

            name = "cpu" if dtype in ("auto", "float32") and available() else "torch"
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


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        self.attention = make_attention_backend(config.attention_backend, self.device, config.dtype)
        self.loaded: LoadedModel = load_model(config, self.device, self.attention)
        self.model = self.loaded.model
        self.model_config = self.loaded.config
        self.dtype = self.loaded.dtype
        if self.attention.name == "triton":  # the CUDA path: launch decisions made once, here
            configure_decode_kernels(self.model, self.attention, self.device, self.dtype, config.max_num_seqs)
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()
        mc = self.model_config
        self.kv_caches = [
            torch.empty(2, self.num_blocks, mc.num_kv_heads, self.block_size, mc.head_dim, dtype=self.dtype, device=self.device)
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
        self.graphs: CudaGraphDecoder | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.graphs = CudaGraphDecoder(self, [b for b in config.cuda_graph_batch_sizes if b <= config.max_num_seqs])
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB), max_model_len %d, attention %s, dtype %s, device %s, cuda graphs %s",
            self.num_blocks, self.block_size, self.kv_cache_bytes / 2**20, self.max_model_len,
            self.attention.name, self.dtype, self.device, "on" if self.graphs else "off",
        )

    @property
    def cuda_graphs_enabled(self) -> bool:
        return self.graphs is not None

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self._bytes_per_block()

    def _bytes_per_block(self) -> int:
        return self.model_config.kv_cache_bytes_per_block(self.block_size, torch.finfo(self.dtype).bits // 8)

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
        from kernels.launch_table import decode_launch

        mc = self.model_config
        return decode_launch(str(self.dtype).removeprefix("torch."), mc.head_dim, mc.num_heads // mc.num_kv_heads,
                             self.block_size, num_seqs, mc.num_kv_heads, self.num_sms)

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

    def _host_block_tables(self, seqs: list[Sequence], num_blocks: int) -> torch.Tensor:
        return self.block_rows.table[:, :num_blocks].index_select(0, self._block_table_row_ids(seqs))

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        for s in sched.scheduled:
            seq, start, end = s.seq, s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start_loc.append(query_start_loc[-1] + s.num_new_tokens)
            seq_lens.append(end)
            if s.samples_next_token:
                logits_indices.append(query_start_loc[-1] - 1)
        max_seq_len = max(seq_lens)
        block_tables = self._host_block_tables([s.seq for s in sched.scheduled], -(-max_seq_len // bs))
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=block_tables.to(dev, non_blocking=True),
            max_query_len=max(s.num_new_tokens for s in sched.scheduled),
            max_seq_len=max_seq_len,
            query_start_loc_host=query_start_loc,
            seq_lens_host=seq_lens,
        )
        if meta.is_decode_only:
            meta.decode_launch = self.decode_launch(len(seq_lens))
        ids = torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True)
        return ids, pos, meta, logits_indices

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        params = [s.params for s in seqs]
        batch = SamplingBatch(
            params=params,
            generators=[self._generator(s) for s in seqs],
            eos_token_ids=self.model_config.eos_token_ids,
        )
        if any(p.uses_penalties or p.min_tokens for p in params):
            batch.prompt_token_ids = [s.prompt_token_ids for s in seqs]
            batch.output_token_ids = [s.output_token_ids for s in seqs]
        return batch

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, allowed_token_bitmask: torch.Tensor | None = None) -> list[SampledToken]:
        """Run one step; return a token for each sequence whose prompt (or decode) completed.
        `allowed_token_bitmask`: a row per sampling sequence, in schedule order (constrained
        decoding; unconstrained rows all ones)."""
        sampling_seqs = [s.seq for s in sched.scheduled if s.samples_next_token]
        decode_only = len(sampling_seqs) == len(sched.scheduled) and all(s.num_new_tokens == 1 for s in sched.scheduled)
        if decode_only and self.graphs is not None and self.graphs.fits(len(sampling_seqs)):
            logits = self.graphs.run_decode(sampling_seqs)
        else:
            input_ids, positions, meta, logits_indices = self.prepare(sched)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
            if not sampling_seqs:
                return []
            logits = self.model.compute_logits(hidden[torch.tensor(logits_indices, device=self.device)])
        batch = self.sampling_batch(sampling_seqs)
        batch.allowed_token_bitmask = allowed_token_bitmask
        return self._to_host(sampling_seqs, sample(logits, batch))

    def can_launch_greedy_run(self, seqs: list[Sequence], num_steps: int) -> bool:
        """Whether `launch_greedy_run` serves this batch: the captured greedy multi-step graph
        covers exactly `num_steps` steps and every row is plain greedy."""
        return (self.graphs is not None and self.graphs.fits(len(seqs)) and num_steps == self.graphs.multi_steps
                and all(s.params.greedy and not s.params.logit_bias for s in seqs))

    @torch.inference_mode()
    def launch_greedy_run(self, seqs: list[Sequence], chained: bool) -> PendingTokens:
        """Start one greedy multi-step graph replay and return without waiting for it.

        `chained=True` continues the previous run of the same batch on the device: its last
        tokens are already the inputs, and positions advance by one run; the host need not
        have read that run's tokens yet. Blocks for every token of the run must be allocated.
        """
        assert self.graphs is not None
        return self.graphs.launch_greedy_steps(seqs, chained)

    @torch.inference_mode()
    def execute_decode_steps(self, seqs: list[Sequence], num_steps: int) -> list[list[int]]:
        """Run `num_steps` decode steps back to back on the device, feeding each step's
        tokens to the next without a host round trip; one sync at the end. Blocks for all the new
        tokens must already be allocated. Returns the tokens of each step, per step. (Batches that
        `can_launch_greedy_run` serves go through `launch_greedy_run` instead, pipelined.)"""
        assert self.graphs is not None and self.graphs.fits(len(seqs))
        batch = self.sampling_batch(seqs)
        steps = []
        tokens = None
        for i in range(num_steps):
            logits = self.graphs.run_decode(seqs, offset=i, device_input_ids=tokens, num_steps=num_steps)
            tokens = sample(logits, batch).token_ids
            steps.append(tokens)
        return torch.stack(steps).tolist()

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


class CudaGraphDecoder:
    """The decode step (one token per sequence -> logits) captured once per batch size.

    Inputs live in static device buffers; a batch is padded to the next
    captured size with rows whose slot is -1 (no cache write) and whose
    sequence length is 0 (attention returns zeros).
    """

    def __init__(self, runner: ModelRunner, batch_sizes: list[int]) -> None:
        self.runner = runner
        self.batch_sizes = sorted(set(batch_sizes))
        dev = runner.device
        max_bs = self.batch_sizes[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(max_bs, runner.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        # Host staging (ids, positions, slots, seq_lens), one per step of a multi-step decode:
        # an upload may still be in flight when the next step's inputs are written.
        self.staging = torch.zeros(max(1, runner.config.num_scheduler_steps), 4, max_bs, dtype=torch.int64, pin_memory=True)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        # Greedy multi-step decode: `multi_steps` whole decode steps in one graph, each step's
        # argmax feeding the next, positions/slots/lengths derived on the device.
        self.multi_steps = runner.config.num_scheduler_steps
        self.base_pos = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.active = torch.zeros(max_bs, dtype=torch.bool, device=dev)
        self.multi_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.step_inputs_kernel = None
        if runner.attention.name == "triton":
            from kernels.decode_step import decode_step_inputs

            self.step_inputs_kernel = decode_step_inputs
        self.multi_tokens: dict[int, torch.Tensor] = {}
        # Two pinned buffers each for a run's tokens (read while the next run is in flight) and
        # its block tables (a pageable upload would wait for the run in flight to finish).
        self.host_tokens = [torch.zeros(max(1, self.multi_steps), max_bs, dtype=torch.int64, pin_memory=True)
                            for _ in range(2)]
        self.host_tables = [torch.zeros(max_bs, runner.max_blocks_per_seq, dtype=torch.int32, pin_memory=True)
                            for _ in range(2)]
        self.next_host_buffer = 0
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
        model, caches = self.runner.model, self.runner.kv_caches
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.batch_sizes):
                meta = self._meta(bs)
                for _ in range(2):  # compile the kernels and settle the allocator before capture
                    model.compute_logits(model(self.input_ids[:bs], self.positions[:bs], caches, meta))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    hidden = model(self.input_ids[:bs], self.positions[:bs], caches, meta)
                    self.logits[bs] = model.compute_logits(hidden)
                pool = graph.pool()
                self.graphs[bs] = graph
                if self.multi_steps > 1:
                    self._decode_steps_body(bs, meta)  # warm-up outside the graph
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        self.multi_tokens[bs] = self._decode_steps_body(bs, meta)
                    self.multi_graphs[bs] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.batch_sizes)

    def _decode_steps_body(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        model, caches, block = self.runner.model, self.runner.kv_caches, self.runner.block_size
        active = self.active[:bs]
        tokens = []
        for i in range(self.multi_steps):
            if self.step_inputs_kernel is not None:  # one launch instead of a dozen
                self.step_inputs_kernel(self.base_pos[:bs], active, self.block_tables[:bs], i, block,
                                        self.positions[:bs], self.seq_lens[:bs], self.slot_mapping[:bs])
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

    def launch_greedy_steps(self, seqs: list[Sequence], chained: bool) -> PendingTokens:
        """`multi_steps` greedy decode steps in one graph replay; the tokens land in pinned host
        memory asynchronously. `chained`: continue the previous replay of this same batch, whose
        last tokens the graph left in `input_ids`; its tokens need not have been read yet."""
        n = len(seqs)
        bs = next(b for b in self.batch_sizes if b >= n)
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
        started = torch.cuda.Event(enable_timing=True)
        started.record()
        buffer = self.next_host_buffer
        self.next_host_buffer ^= 1
        tables = torch.index_select(self.runner.block_rows.table, 0, self.runner._block_table_row_ids(seqs),
                                    out=self.host_tables[buffer][:n])
        self.block_tables[:n].copy_(tables, non_blocking=True)
        self.multi_graphs[bs].replay()
        host = self.host_tokens[buffer][:, :n]
        host.copy_(self.multi_tokens[bs][:, :n], non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return PendingTokens(host, started, done)

    def run_decode(self, seqs: list[Sequence], offset: int = 0, device_input_ids: torch.Tensor | None = None,
                   num_steps: int = 1) -> torch.Tensor:
        """Logits [len(seqs), vocab] for each sequence's next token.

        offset > 0 runs the step `offset` tokens ahead of what the host knows
        (multi-step decode): token ids then come from `device_input_ids`, and
        the block tables uploaded at offset 0 already cover all `num_steps`.
        """
        n = len(seqs)
        bs = next(b for b in self.batch_sizes if b >= n)
        block = self.runner.block_size
        ids, positions, slots, lens = [], [], [], []
        for seq in seqs:
            pos = seq.num_tokens - 1 + offset
            ids.append(seq.token_ids[-1])
            positions.append(pos)
            slots.append(seq.block_table[pos // block] * block + pos % block)
            lens.append(pos + 1)
        pad = bs - n
        staging = self.staging[offset]
        staging[:, :bs] = torch.tensor([ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad, lens + [0] * pad])
        dev_staging = staging[:, :bs].to(self.runner.device, non_blocking=True)
        if device_input_ids is None:
            self.input_ids[:bs].copy_(dev_staging[0])
        else:
            self.input_ids[:n].copy_(device_input_ids[:n])
        self.positions[:bs].copy_(dev_staging[1])
        self.slot_mapping[:bs].copy_(dev_staging[2])
        self.seq_lens[:bs].copy_(dev_staging[3])
        if offset == 0:
            max_blocks = (max(lens) + num_steps - 2) // block + 1
            tables = self.runner._host_block_tables(seqs, max_blocks)
            self.block_tables[:n, :max_blocks].copy_(tables)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
