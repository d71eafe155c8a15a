"""Continuous-batching scheduler: who runs this step, and with how many tokens.

Plain Python: no torch. Each step has a token budget. Running sequences go
first (one token each when decoding, the next chunk when their prompt is
still being prefilled), then waiting sequences are admitted in arrival order
while the budget, the sequence limit and the free blocks allow. When a
running sequence cannot get a block, the most recently admitted running
sequence is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    # While any running sequence decodes, prompt chunks add at most this many tokens to a step
    # (None: the whole budget): a stream's inter-token gap is then at most one step of this many
    # prompt tokens, however long the prompts being admitted.
    max_prefill_tokens_while_decoding: int | None = None


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    # num_computed_tokens before this step runs.
    num_computed_tokens: int
    # True when this step computes the last known token, so its logits are sampled.
    samples_next_token: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples_next_token = self.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queue management ----------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark `seq` finished and free its blocks at once (also used for aborts)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- the decision --------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        prefill_budget = budget
        cap = self.config.max_prefill_tokens_while_decoding
        if cap is not None and self.config.enable_chunked_prefill \
                and any(s.num_tokens - s.num_computed_tokens == 1 for s in self.running):
            prefill_budget = cap

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = seq.num_tokens - seq.num_computed_tokens
            prompt_chunk = remaining > 1  # still prefilling (a decode computes exactly one token)
            num_new = min(remaining, budget, prefill_budget) if prompt_chunk else 1
            if num_new < 1:  # a prompt chunk, and this step has no prompt budget left
                i += 1
                continue
            while not bm.allocate(seq, seq.num_computed_tokens + num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSequence(seq, num_new, seq.num_computed_tokens))
                budget -= num_new
                if prompt_chunk:
                    prefill_budget -= num_new
                i += 1
                continue
            break  # `seq` itself was preempted: nothing after it can run either

        now = time.monotonic()
        while (
            self.waiting
            and budget > 0
            and prefill_budget > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            cached = bm.find_cached_prefix(seq)
            num_computed = len(cached) * bm.block_size
            num_new = seq.num_tokens - num_computed
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget, prefill_budget)
            if not bm.allocate(seq, num_computed + num_new, cached):
                break
            if bm.enable_prefix_caching:
                bm.record_prefix_query(seq.num_tokens, num_computed)
            self.waiting.popleft()
            seq.num_computed_tokens = num_computed
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time_s is None:
                seq.first_scheduled_time_s = now
                seq.num_cached_tokens = num_computed
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new, num_computed))
            budget -= num_new
            prefill_budget -= num_new
        return out

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts and publish newly full blocks to the prefix cache."""
        for s in out.scheduled:
            if s.seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            s.seq.num_computed_tokens = s.num_computed_tokens + s.num_new_tokens
            self.block_manager.cache_full_blocks(s.seq)
