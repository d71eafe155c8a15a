"""The synchronous engine core: requests in, one scheduler step at a time, deltas out."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import ContextLengthExceeded, InvalidRequest
from engine.grammar_workers import GrammarWorkers, SpawnedWorkers, default_grammar_workers
from engine.model_runner import GrammarRun, ModelRunner, PendingTokens, SampledToken, compile_manifest_key, resolve_device
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence, SequenceStatus
from engine.structured_output import ACCEPTED, REJECTED, GrammarSteps, StructuredOutputs
from roseinfer_kernels.precompile import manifest_path, record_compiles, write_manifest

logger = logging.getLogger(__name__)

# How long a decode run with constrained rows should take: its steps are as many as fit in this
# (from the last such run's time a step), from num_scheduler_steps up to
# EngineConfig.max_constrained_run_steps. Each run's end costs the device about a millisecond
# (engine.config.CONSTRAINED_RUN_FACTOR); this bounds how long its streams wait for their next
# tokens, and an arriving request for its turn (about two runs: the one in flight and the one
# chained onto it).
CONSTRAINED_RUN_TARGET_S = 0.02


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one request produced in one step (a delta), or its final state."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    new_logprobs: list[TokenLogprob] | None = None
    arrival_time_s: float = 0.0
    first_scheduled_time_s: float | None = None
    first_token_time_s: float | None = None
    token_time_s: float | None = None  # when this delta's tokens were produced
    finished_time_s: float | None = None
    # Set when the request failed where it ran (a data-parallel engine core died): its stream ends
    # with EngineDead and this message instead of tokens.
    error: str | None = None


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta carrying both `earlier` and `later` (consecutive deltas of one request)."""
    logprobs = None
    if earlier.new_logprobs is not None or later.new_logprobs is not None:
        logprobs = (earlier.new_logprobs or []) + (later.new_logprobs or [])
    return replace(later, new_token_ids=earlier.new_token_ids + later.new_token_ids,
                   new_text=earlier.new_text + later.new_text, new_logprobs=logprobs)


@dataclass
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    # Constrained decoding: the grammar matcher once the request's grammar has compiled.
    matcher: object | None = None


@dataclass
class _DecodeRun:
    """A greedy multi-step run launched on the device whose tokens the host has not read yet."""

    seqs: list[Sequence]
    pending: PendingTokens
    num_steps: int


@dataclass
class StepStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_batched_tokens: int
    num_preemptions: int
    prefix_cache_queries: int = 0  # cumulative, in prompt tokens
    prefix_cache_hits: int = 0


def build_sequence(tokenizer, vocab_size: int, max_model_len: int, request_id: str, prompt: str | list[int],
                   params: SamplingParams) -> Sequence:
    """Validate and tokenize a request: the part of admission that needs no engine state, so the
    API process can do it when the engine runs in another (engine/engine_process.py)."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        token_ids = tokenizer.encode(prompt)
    else:
        token_ids = [int(t) for t in prompt]
        if any(not 0 <= t < vocab_size for t in token_ids):
            raise InvalidRequest(f"token ids must be in [0, {vocab_size})", param="prompt")
    if not token_ids:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    num_prompt = len(token_ids)
    if num_prompt >= max_model_len:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {max_model_len} tokens; "
            f"the prompt has {num_prompt} tokens", param="prompt",
        )
    if params.max_tokens is None:
        params = replace(params, max_tokens=max_model_len - num_prompt)
    elif num_prompt + params.max_tokens > max_model_len:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {max_model_len} tokens; you requested "
            f"{num_prompt + params.max_tokens} tokens ({num_prompt} in the prompt, {params.max_tokens} "
            "for the completion)", param="max_tokens",
        )
    return Sequence(request_id, token_ids, params)


class LLMEngine:
    # Requests and aborts must wait for the step in flight (AsyncEngine queues them): engine state
    # is plain Python, touched by one thread at a time.
    accepts_commands_while_stepping = False

    def __init__(self, config: EngineConfig) -> None:
        recording = os.environ.get("ROSEINFER_RECORD_COMPILES") == "1"  # see _write_compile_manifest
        with record_compiles() if recording else contextlib.nullcontext() as compiles:
            self._start(config)
        if recording:
            self._write_compile_manifest(config, compiles)

    def _write_compile_manifest(self, config: EngineConfig, compiles: list[dict]) -> None:
        """ROSEINFER_RECORD_COMPILES=1: the Triton kernels this start-up (load, capture, warm-up)
        compiled, merged into roseinfer_kernels.precompile's manifest, which a cold start of the same model
        and settings then compiles in parallel ahead (commit the file: it ships with the package)."""
        path = manifest_path()
        count = write_manifest(path, compiles, compile_manifest_key(config))
        logger.info("recorded %d Triton compiles into %s (%d entries)", len(compiles), path, count)

    def _start(self, config: EngineConfig) -> None:
        workers = config.grammar_workers
        if workers is None:  # auto: only where the grammar has cores beside the step thread and a GPU
            workers = default_grammar_workers(resolve_device(config.device).type)
        # Started before the graphs are captured, so that their imports (torch, xgrammar) run
        # meanwhile, but after a cold start's compile pool, whose processes import torch too and
        # which the engine waits for. (Spawned before the model loaded, beside the pool, the 8B's
        # cold ready time on the H200 was 18.1-18.6 s, the pool waited for 6.5-6.7 s; spawned after
        # the load it had been 14.8 s. This order is not measured yet.)
        spawned_ahead: list[SpawnedWorkers | None] = []
        try:
            self.runner = ModelRunner(config, after_precompile=lambda: spawned_ahead.append(SpawnedWorkers.ahead(workers)))
        except BaseException:
            for spawned in filter(None, spawned_ahead):
                spawned.close()
            raise
        (spawned,) = spawned_ahead  # the runner calls after_precompile once whenever it builds
        self.config = config = self.runner.config  # with the device's defaults filled in
        self.tokenizer = self.runner.loaded.tokenizer
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill,
                            config.max_prefill_tokens_while_decoding),
            self.block_manager,
        )
        self.requests: dict[str, _Request] = {}
        # Constrained requests whose grammar is compiling (on worker threads): they join the
        # scheduler once it is ready, and the batch keeps stepping meanwhile.
        self.structured = StructuredOutputs.for_tokenizer(self.tokenizer, self.model_config.vocab_size,
                                                          self.model_config.eos_token_ids,
                                                          pin_bitmask=self.runner.device.type == "cuda")
        self._compiling: dict[str, Future] = {}
        grammar_workers = GrammarWorkers.start(self.structured, spawned, config.max_num_seqs)
        self.last_step = StepStats(0, 0, 0.0, 0, 0)
        # While set, the scheduler is bypassed: the next step reads this run (after chaining the
        # following run of the same batch onto the device, when nothing changed).
        self._inflight: _DecodeRun | GrammarRun | None = None
        self._constrained_run_steps = config.num_scheduler_steps  # the next constrained run's (_finish_grammar_run)
        # Device time of the greedy multi-step runs read so far: against wall time it tells
        # whether decoding is bound by the GPU or by the host (roseinfer bench reports it).
        self.decode_run_gpu_s = 0.0
        if self.runner.device.type == "cuda":
            self.warm_up()
        if grammar_workers is not None:
            grammar_workers.wait_ready()

    def shutdown(self) -> None:
        """Release what outlives a step: the tensor-parallel and grammar worker processes."""
        self.runner.shutdown()
        self.structured.close()

    def warm_up(self) -> None:
        """Serve a few throwaway requests, one at a time, so that every kernel variant and buffer
        size a real request meets has been compiled, chosen or allocated before the first one
        arrives: prefill steps of 1 to a whole budget of tokens (each row tile of the skinny
        projections, and cuBLAS above), a prefix-cache hit, a sampled request with logprobs and
        penalties, a pipelined greedy run. The CUDA graphs were captured before this; counters
        are reset after it."""
        start = time.monotonic()
        rng = random.Random(0)
        vocab = self.model_config.vocab_size
        budget = min(self.config.max_num_batched_tokens, self.max_model_len - 1 - 2 * self.config.num_scheduler_steps)
        base = [rng.randrange(vocab) for _ in range(budget)]
        greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        runs: list[tuple[list[int], SamplingParams]] = [
            (base[:1], replace(greedy, max_tokens=2 + 2 * self.config.num_scheduler_steps)),
            *((base[-n:], greedy) for n in sorted({3, 17, 40, 100, budget}) if n <= budget),
            (base[-40:] + base[:5], greedy),  # shares 32+ tokens (whole blocks) with the 40-token prompt
            (base[:9], SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, top_k=50, min_p=0.01, seed=1,
                                      logprobs=2, presence_penalty=0.1, repetition_penalty=1.1, ignore_eos=True)),
        ]
        for i, (prompt, params) in enumerate(runs):
            self.add_request(f"warm-up-{i}", prompt, params)
            while self.has_unfinished():
                self.step()
        self.runner.warm_up_token_mask()  # a constrained request's grammar would take seconds to build here
        self.block_manager.prefix_cache_queries = self.block_manager.prefix_cache_hits = 0
        self.scheduler.num_preemptions = 0
        self.decode_run_gpu_s = 0.0
        self.last_step = self._stats(0)
        logger.info("warm-up: %d requests in %.2f s", len(runs), time.monotonic() - start)

    @property
    def model_name(self) -> str:
        return self.config.model

    # ---- requests ------------------------------------------------------------------------
    def make_sequence(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Sequence:
        """Validate and tokenize a request without touching engine state (safe while a step runs)."""
        return build_sequence(self.tokenizer, self.model_config.vocab_size, self.max_model_len, request_id, prompt, params)

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise InvalidRequest(f"duplicate request id {seq.request_id!r}")
        detok = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, seq.params.stop,
            seq.params.include_stop_str_in_output, seq.params.skip_special_tokens,
        )
        self.requests[seq.request_id] = _Request(seq, detok)
        if seq.params.structured_output is None:
            self.scheduler.add(seq)
        else:
            self._compiling[seq.request_id] = self.structured.compile_async(seq.params.structured_output)
            self.requests[seq.request_id].matcher = self.structured.reserve(seq.params.structured_output)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Sequence:
        seq = self.make_sequence(request_id, prompt, params)
        self.add_sequence(seq)
        return seq

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks now. False if it was unknown or done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if self._compiling.pop(request_id, None) is not None:  # never reached the scheduler
            req.seq.status, req.seq.finish_reason = SequenceStatus.FINISHED, "abort"
        else:
            self.scheduler.finish(req.seq, "abort")
        self.runner.release(request_id)
        if req.matcher is not None:
            self.structured.release(req.matcher)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._compiling)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Constrained requests whose grammar is ready join the scheduler with their matcher; one
        whose grammar failed to compile (the API validates first, so rarely) finishes aborted.
        With nothing else to run, wait briefly for a compile instead of spinning."""
        if not self._compiling:
            return []
        if not self.scheduler.has_unfinished():
            wait_futures(list(self._compiling.values()), timeout=0.05, return_when=FIRST_COMPLETED)
        failed = []
        for request_id, future in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            req = self.requests[request_id]
            if future.exception() is not None:
                del self.requests[request_id]
                if req.matcher is not None:
                    self.structured.release(req.matcher)
                req.seq.status, req.seq.finish_reason = SequenceStatus.FINISHED, "abort"
                message = getattr(future.exception(), "message", str(future.exception()))
                failed.append(RequestOutput(request_id, [], "", True, finish_reason="abort", stop_reason=message,
                                            num_prompt_tokens=req.seq.num_prompt_tokens))
                continue
            if req.matcher is None:
                req.matcher = self.structured.matcher(future.result(), req.seq.params.structured_output)
            self.scheduler.add(req.seq)
        return failed

    def _bitmask_filler(self, sched):
        """A function giving each sampling row's allowed tokens from its matcher (all ones when
        unconstrained), or None when no row of this step is constrained. The runner calls it after
        launching the forward pass, so the grammar work overlaps the GPU's."""
        matchers = [self.requests[s.seq.request_id].matcher for s in sched.scheduled if s.samples_next_token]
        if not any(m is not None for m in matchers):
            return None
        return lambda: self.structured.fill_bitmask(matchers)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self._inflight is not None:
            run, self._inflight = self._inflight, None
            if isinstance(run, GrammarRun):
                return self._finish_grammar_run(run)
            return self._finish_decode_run(run)
        failed = self._admit_compiled()
        sched = self.scheduler.schedule()
        for seq in sched.preempted:
            self.runner.on_preempted(seq)
        if sched.is_empty:
            self.last_step = self._stats(0)
            return failed
        num_steps = self._multi_step_count(sched)
        if num_steps > 1:
            return failed + self._decode_steps(sched, num_steps)
        sampled = self.runner.execute(sched, self._bitmask_filler(sched))
        self.scheduler.on_step_done(sched)
        now = time.monotonic()
        ended = self._grammar_ends_of_step(sampled)
        outputs = [self._process(tok.seq, [tok.token_id], now, tok, grammar_ended=end) for tok, end in zip(sampled, ended)]
        self.last_step = self._stats(sched.num_batched_tokens)
        return failed + outputs

    def _grammar_ends_of_step(self, sampled: list[SampledToken]) -> list[bool | None]:
        """With grammar workers, a single step's tokens go to their matchers in one round trip (not
        one a request, as `_process` would take them): whether each constrained row's grammar
        ended (took its stop token, or rejected the token); None for the others (and without
        workers, where `_process` feeds its matcher itself)."""
        workers = self.structured.workers
        matchers = [self.requests[tok.seq.request_id].matcher for tok in sampled]
        if workers is None or not any(m is not None for m in matchers):
            return [None] * len(sampled)
        statuses = workers.step(matchers, [tok.token_id for tok in sampled], fill=False)[1]
        for tok, m, status in zip(sampled, matchers, statuses):
            if m is not None and status == REJECTED:  # the mask allows only tokens it accepts
                logger.warning("request %s: token %d rejected by its grammar", tok.seq.request_id, tok.token_id)
        return [None if m is None else status != ACCEPTED for m, status in zip(matchers, statuses)]

    def _can_admit(self) -> bool:
        """Someone waits (a constrained request whose grammar has compiled counts) and the batch has
        room: run single steps so they join at once. With the batch full, waiting requests cannot
        join before a running one finishes anyway, and a finish ends the multi-step run."""
        waiting = bool(self.scheduler.waiting) or any(f.done() for f in self._compiling.values())
        return waiting and len(self.scheduler.running) < self.config.max_num_seqs

    def _multi_step_count(self, sched) -> int:
        """How many decode steps may run back to back: only when every running sequence is
        decoding, nobody could join the batch, and no sequence can hit max_tokens or the context
        inside the run (except by one step, whose token is dropped, where that keeps the run whole).
        A one-token prompt's first step looks like a decode step but is its prefill: it runs
        alone, so its first token is out after one step, not a whole run. A batch with constrained
        rows runs `_constrained_run_steps`."""
        k = self.config.num_scheduler_steps
        if k >= 2 and any(self.requests[s.seq.request_id].matcher is not None for s in sched.scheduled):
            k = self._constrained_run_steps
        cap = k
        if k < 2 or self.runner.graphs is None or self._can_admit() or sched.preempted:
            return 1
        if len(sched.scheduled) != len(self.scheduler.running) or not self.runner.graphs.fits(len(sched.scheduled)):
            return 1
        for s in sched.scheduled:
            seq = s.seq
            p = seq.params
            if s.num_new_tokens != 1 or not s.samples_next_token or p.logprobs is not None or p.uses_penalties or p.min_tokens:
                return 1
            if seq.num_output_tokens == 0:
                return 1  # a first token (TTFT)
            left = (p.max_tokens or 0) - seq.num_output_tokens
            room = self.max_model_len - seq.num_tokens
            if left == cap - 1 and room >= left + 1:
                left += 1  # one step past max_tokens (its token is dropped) beats a short run's host round trips
            k = min(k, left, room)
            if k < 2:
                return 1
        bm = self.block_manager
        for s in sched.scheduled:  # blocks for every token of the run, up front
            if not bm.allocate(s.seq, s.seq.num_tokens - 1 + k):
                return 1
        return k

    def _decode_steps(self, sched, num_steps: int) -> list[RequestOutput]:
        seqs = [s.seq for s in sched.scheduled]
        matchers = [self.requests[seq.request_id].matcher for seq in seqs]
        if any(m is not None for m in matchers):
            # Constrained rows: each step masked by its grammar, which sees each token before the next.
            return self._finish_grammar_run(self.runner.launch_grammar_run(seqs, num_steps,
                                                                           GrammarSteps(self.structured, matchers)))
        if self.runner.can_launch_pipelined_run(seqs, num_steps):
            run = _DecodeRun(seqs, self.runner.launch_pipelined_run(seqs, chained=False), num_steps)
            return self._finish_decode_run(run)
        return self._accept_decode_run(seqs, self.runner.execute_decode_steps(seqs, num_steps), num_steps)

    def _finish_decode_run(self, run: _DecodeRun) -> list[RequestOutput]:
        """Read `run`'s tokens; first, when the batch may go on unchanged, launch its next run so
        the device computes while the host processes these tokens (the house pipeline)."""
        if self._can_chain(run):
            self._inflight = _DecodeRun(run.seqs, self.runner.launch_pipelined_run(run.seqs, chained=True), run.num_steps)
        tokens = run.pending.wait()
        self.decode_run_gpu_s += run.pending.gpu_s
        return self._accept_decode_run(run.seqs, tokens, run.num_steps)

    def _finish_grammar_run(self, run: GrammarRun) -> list[RequestOutput]:
        """Run a constrained run's steps and read its tokens; when the batch may go on unchanged,
        its next run's first forward is queued before this one's outputs are processed."""
        if all(seq.is_finished for seq in run.seqs):
            return []  # a chained run whose requests all ended meanwhile: its queued forward is moot
        next_steps = self._constrained_run_steps
        start = time.perf_counter()
        tokens = run.finish(self._can_chain(run, next_steps), next_steps)
        step_s = (time.perf_counter() - start) / run.num_steps
        self._constrained_run_steps = max(self.config.num_scheduler_steps, min(
            self.config.max_constrained_run_steps, int(CONSTRAINED_RUN_TARGET_S / max(step_s, 1e-6))))
        self._inflight = run.next
        return self._accept_decode_run(run.seqs, tokens, run.num_steps, run.grammar.ends)

    def _can_chain(self, run: _DecodeRun | GrammarRun, next_steps: int | None = None) -> bool:
        """The next run of `run.seqs` (`next_steps` steps, default as many as `run`) may start
        before `run` is read: nobody joined, left or could join, and no sequence can reach
        max_tokens or the context within both runs. A sequence that stops on EOS or a stop string
        inside `run` wastes its share of the next run; the batch then changes and the pipeline drains."""
        seqs = run.seqs
        both = run.num_steps + (next_steps or run.num_steps)
        if self._can_admit() or len(self.scheduler.running) != len(seqs):
            return False
        for seq in seqs:
            if seq.is_finished or seq.num_output_tokens + both > (seq.params.max_tokens or 0) \
                    or seq.num_tokens + both > self.max_model_len:
                return False
        bm = self.block_manager
        # The next run writes positions up to num_tokens - 2 + both (the host has not counted `run`'s tokens).
        return all(bm.allocate(seq, seq.num_tokens - 1 + both) for seq in seqs)

    def _accept_decode_run(self, seqs: list[Sequence], steps: list[list[int]], num_steps: int,
                           grammar_ends: dict[int, int] | None = None) -> list[RequestOutput]:
        """`grammar_ends` (a run with constrained rows): the matchers have taken the run's tokens
        already; a row whose grammar ended inside the run keeps its tokens up to that point."""
        now = time.monotonic()
        bm = self.block_manager
        outputs = []
        for j, seq in enumerate(seqs):
            if seq.is_finished:  # aborted while the run was in flight
                continue
            tokens = [step[j] for step in steps]
            if grammar_ends is None:
                outputs.append(self._process(seq, tokens, now))
            else:
                end = grammar_ends.get(j)
                outputs.append(self._process(seq, tokens[:end], now, grammar_ended=end is not None))
            if not seq.is_finished:
                # The run computed every token but the newest one; publish blocks that filled up.
                seq.num_computed_tokens = seq.num_tokens - 1
                bm.cache_full_blocks(seq)
        self.last_step = self._stats(len(seqs) * num_steps)
        return outputs

    def _stats(self, num_batched_tokens: int) -> StepStats:
        bm = self.block_manager
        return StepStats(
            len(self.scheduler.running), len(self.scheduler.waiting), bm.usage(),
            num_batched_tokens, self.scheduler.num_preemptions, bm.prefix_cache_queries, bm.prefix_cache_hits,
        )

    def live_stats(self) -> StepStats:
        """The gauges as of now (aborts since the last step included)."""
        return self._stats(self.last_step.num_batched_tokens)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def _process(self, seq: Sequence, tokens: list[int], now: float, sampled: SampledToken | None = None,
                 grammar_ended: bool | None = None) -> RequestOutput:
        """Append sampled tokens to `seq` in order, stopping at the first stop condition.
        `grammar_ended` is given when the request's matcher has taken `tokens` already (a
        constrained decode run): whether its grammar ended at the last of them."""
        req = self.requests[seq.request_id]
        params = seq.params
        detok = req.detokenizer
        eos = () if params.ignore_eos else self.model_config.eos_token_ids
        if seq.first_token_time_s is None:
            seq.first_token_time_s = now
        seq.last_token_time_s = now
        reason: str | None = None
        stop_reason: int | str | None = None
        stop_str: str | None = None
        num_out = seq.num_output_tokens
        # Tokens this call may accept before max_tokens or the context length stops it.
        room = min(len(tokens), (params.max_tokens or 0) - num_out, self.max_model_len - seq.num_tokens)
        if not params.stop:
            # Token-level stops only: find the cut without touching text, then detokenize once.
            cut = room
            stop_ids = params.stop_token_ids
            if stop_ids or eos:
                first_allowed = max(0, params.min_tokens - num_out - 1)
                for i in range(first_allowed, room):
                    token = tokens[i]
                    if token in stop_ids:
                        cut, reason, stop_reason = i + 1, "stop", token
                        break
                    if token in eos:
                        cut, reason = i + 1, "stop"
                        break
            accepted = tokens[:cut]
            if reason is None and cut == room and cut > 0:
                reason = "length" if (cut < len(tokens) or num_out + cut >= (params.max_tokens or 0)
                                      or seq.num_tokens + cut >= self.max_model_len) else None
            seq.token_ids.extend(accepted)
            detok.add_tokens(accepted)
        else:
            accepted = []
            for token in tokens[:max(room, 0)]:
                seq.token_ids.append(token)
                accepted.append(token)
                num_out += 1
                stop_str = detok.add_token(token)
                if stop_str is not None:
                    reason, stop_reason = "stop", stop_str
                elif num_out >= params.min_tokens and token in params.stop_token_ids:
                    reason, stop_reason = "stop", token
                elif num_out >= params.min_tokens and token in eos:
                    reason = "stop"
                elif num_out >= (params.max_tokens or 0) or seq.num_tokens >= self.max_model_len:
                    reason = "length"
                if reason is not None:
                    break

        if req.matcher is not None and accepted:
            ended = grammar_ended
            if ended is None:  # a single step: the matcher takes the token here
                ended = False
                for token in accepted:
                    if not req.matcher.accept_token(token):  # the mask allows only tokens it accepts
                        logger.warning("request %s: token %d rejected by its grammar", seq.request_id, token)
                        ended = True
                        break
                ended = ended or req.matcher.is_terminated()
            if ended:
                reason = reason or "stop"  # the grammar is complete (and took its stop token)
        finished = reason is not None
        if finished:
            if stop_str is None:
                detok.flush()
            self.scheduler.finish(seq, reason, stop_reason)  # type: ignore[arg-type]
            self.runner.release(seq.request_id)
            del self.requests[seq.request_id]
            if req.matcher is not None:
                self.structured.release(req.matcher)

        logprobs = None
        if sampled is not None and sampled.logprob is not None:
            logprobs = [TokenLogprob(sampled.token_id, sampled.logprob, sampled.top_logprobs or [])]
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=accepted,
            new_text=detok.take_new_text(finished),
            finished=finished,
            finish_reason=reason,
            stop_reason=stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            new_logprobs=logprobs,
            arrival_time_s=seq.arrival_time_s,
            first_scheduled_time_s=seq.first_scheduled_time_s,
            first_token_time_s=seq.first_token_time_s,
            token_time_s=now,
            finished_time_s=now if finished else None,
        )
