"""Tensors in, sampled tokens out: input preparation, the paged KV cache, the forward pass.

The runner executes what the scheduler decided; it owns the model, the KV
cache (one preallocated tensor per layer) and the per-request RNGs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, make_attention_backend
from engine.config import EngineConfig
from engine.loader import LoadedModel, load_model
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


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        self.attention = make_attention_backend(config.attention_backend, self.device)
        self.loaded: LoadedModel = load_model(config, self.device, self.attention)
        self.model = self.loaded.model
        self.model_config = self.loaded.config
        self.dtype = self.loaded.dtype
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()
        mc = self.model_config
        self.kv_caches = [
            torch.empty(2, self.num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim, dtype=self.dtype, device=self.device)
            for _ in range(mc.num_layers)
        ]
        self.max_model_len = min(
            config.max_model_len or mc.max_position_embeddings,
            mc.max_position_embeddings,
            self.num_blocks * self.block_size,
        )
        self.generators: dict[str, torch.Generator] = {}
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB), max_model_len %d, attention %s, dtype %s, device %s",
            self.num_blocks, self.block_size, self.kv_cache_bytes / 2**20, self.max_model_len,
            self.attention.name, self.dtype, self.device,
        )

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

    # ---- per-request state ----------------------------------------------------------
    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        gen = self.generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seq.params.seed)
            self.generators[seq.request_id] = gen
        return gen

    # ---- one step ------------------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        max_blocks = 0
        for s in sched.scheduled:
            seq, start, end = s.seq, s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start_loc.append(query_start_loc[-1] + s.num_new_tokens)
            seq_lens.append(end)
            max_blocks = max(max_blocks, -(-end // bs))
            if s.samples_next_token:
                logits_indices.append(query_start_loc[-1] - 1)
        block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
        for i, s in enumerate(sched.scheduled):
            n = -(-seq_lens[i] // bs)
            block_tables[i, :n] = torch.tensor(s.seq.block_table[:n], dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64).to(dev, non_blocking=True),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=block_tables.to(dev, non_blocking=True),
            max_query_len=max(s.num_new_tokens for s in sched.scheduled),
            max_seq_len=max(seq_lens),
            query_start_loc_host=query_start_loc,
            seq_lens_host=seq_lens,
        )
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
    def execute(self, sched: SchedulerOutput) -> list[SampledToken]:
        """Run one step; return a token for each sequence whose prompt (or decode) completed."""
        input_ids, positions, meta, logits_indices = self.prepare(sched)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        sampling_seqs = [s.seq for s in sched.scheduled if s.samples_next_token]
        if not sampling_seqs:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(logits_indices, device=self.device)])
        return self._to_host(sampling_seqs, sample(logits, self.sampling_batch(sampling_seqs)))

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
