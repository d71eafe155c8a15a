"""Constrained decoding with xgrammar: what a request's output must match (a JSON schema, any JSON
object, a regex, one of several strings, or an EBNF grammar), compiled once per distinct spec and
cached, one matcher per request, and the allowed-token bitmask each step fills for the sampler.

Compilation runs on worker threads (`compile_async`): the engine admits a constrained request to
the scheduler only once its grammar is ready, so other requests keep stepping meanwhile. The API
processes compile the same spec first (`validate`, off their event loop) so an invalid schema or
regex is a 400 before anything is queued.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from engine.errors import InvalidRequest
from engine.sampling_params import StructuredOutputSpec

logger = logging.getLogger(__name__)

# What a row's grammar did with a step's token, as grammar workers report it (engine.grammar_workers).
ACCEPTED, TERMINATED, REJECTED = 0, 1, 2


class StructuredOutputs:
    """Compiles specs against one tokenizer's vocabulary (built on first use) and hands out
    matchers. Thread-safe: compilation runs on a small pool; the cache is keyed by the spec and
    bounded: past `cache_limit_bytes` of compiled grammars (30-200 KB each over GPT-2's vocabulary)
    the least recently used go, so a server whose every request brings its own schema or tools
    does not grow without end. A request holding a matcher keeps its grammar alive regardless."""

    def __init__(self, token_bytes: list[bytes] | None, vocab_size: int, stop_token_ids: tuple[int, ...],
                 threads: int = 2, pin_bitmask: bool = False, cache_limit_bytes: int = 256 * 2**20) -> None:
        self.token_bytes = token_bytes
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.stop_token_set = frozenset(stop_token_ids)
        self._compiler = None
        # Two locks: building the compiler (0.5 s and more) must not hold up compile_async's
        # cache lookups, which the engine loop and the API processes make.
        self._compiler_lock = threading.Lock()
        self._lock = threading.Lock()
        self._cache: OrderedDict[StructuredOutputSpec, Future] = OrderedDict()  # least recently used first
        self._sizes: dict[StructuredOutputSpec, int] = {}  # compiled grammars' bytes, once known
        self.cache_limit_bytes = cache_limit_bytes
        self._threads = threads  # compiles at once, and xgrammar's threads within one
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="roseinfer-grammar")
        self.pin_bitmask = pin_bitmask
        self._bitmask: torch.Tensor | None = None
        # Bitmask rows are filled on one thread or in parallel (half the cores, up to 8), whichever
        # the step's grammar states make cheaper: see FillThreads.
        self._fill = FillThreads(max(1, min(8, (os.cpu_count() or 2) // 2)))
        self.workers = None  # engine.grammar_workers.GrammarWorkers, once attached

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...],
                      pin_bitmask: bool = False) -> StructuredOutputs:
        # Special tokens as empty strings: xgrammar then never places them inside the output,
        # only the stop tokens at its end.
        return cls(tokenizer.token_bytes_table(skip_special_tokens=True), vocab_size, stop_token_ids,
                   pin_bitmask=pin_bitmask)

    def _get_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                if self.token_bytes is None:
                    raise InvalidRequest("structured outputs need a byte-level BPE vocabulary; this model's is not")
                self._compiler = grammar_compiler(self.token_bytes, self.vocab_size, self.stop_token_ids,
                                                  threads=self._threads)
            return self._compiler

    def prepare(self) -> None:
        """Import xgrammar and build the vocabulary's tokenizer info now, at start-up (1-3 s: the
        import pulls in much of transformers; 0.5 s more for a 49k vocabulary on one core). Done
        on a background thread instead, it stalled every stream of its process for ~1.4 s at a
        time during the first seconds of serving: the import holds Python's import lock, which
        the request path's own first imports then wait on (client TTFT p99 1.4 s at 32 requests/s
        with the server's own TTFT under 10 ms, H200, docs/BENCHMARKS.md)."""
        if self.token_bytes is not None:
            self._get_compiler()

    def _compile(self, spec: StructuredOutputSpec):
        return compile_spec(self._get_compiler(), spec)

    def compile_async(self, spec: StructuredOutputSpec) -> Future:
        """The compiled grammar, as a future: the cached one, or compiling on a worker thread."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
            future = self._pool.submit(self._compile_and_cache, spec)
            self._cache[spec] = future
            return future

    def _compile_and_cache(self, spec: StructuredOutputSpec):
        """Compile on a worker; count the grammar's bytes and drop the least recently used past
        the limit before the future completes (so a caller sees the cache as it will stay)."""
        try:
            compiled = self._compile(spec)
        except BaseException:
            with self._lock:  # a bad spec is not kept: the next request with it compiles (and fails) anew
                self._cache.pop(spec, None)
            raise
        with self._lock:
            if spec in self._cache:  # a pending entry is never evicted: this is still ours
                self._sizes[spec] = compiled.memory_size_bytes
                total = sum(self._sizes.values())
                for old in list(self._cache):
                    if total <= self.cache_limit_bytes:
                        break
                    if old in self._sizes and old != spec:  # compiling ones have no size yet: they stay
                        total -= self._sizes.pop(old)
                        del self._cache[old]
        return compiled

    def validate(self, spec: StructuredOutputSpec) -> None:
        """Compile now (blocking: call off the event loop); InvalidRequest if the spec is bad."""
        self.compile_async(spec).result()

    def attach_workers(self, workers) -> None:
        """Hold new requests' matchers in these processes from now on (engine.grammar_workers.GrammarWorkers)."""
        self.workers = workers

    def reserve(self, spec: StructuredOutputSpec):
        """With grammar workers, a request's matcher as it arrives (its worker compiles the grammar
        while the engine does: engine.grammar_workers.GrammarWorkers.add); else None, and `matcher`
        makes one once the grammar has compiled."""
        return self.workers.add(spec) if self.workers is not None else None

    def matcher(self, compiled, spec: StructuredOutputSpec | None = None):
        """A new matcher for a request: in a worker process when there are workers (the caller
        releases it with `release`), else in this one."""
        if self.workers is not None and spec is not None:
            return self.workers.add(spec)
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    def release(self, matcher) -> None:
        """A finished request's matcher: a worker's is dropped there (one of ours is garbage)."""
        if self.workers is not None and hasattr(matcher, "slot"):
            self.workers.remove(matcher)

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def fill_bitmask(self, matchers: list, before_fill: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """The allowed-token bitmask of a step, [len(matchers), ceil(vocab / 32)] int32, one bit per
        token (1 = allowed): each matcher's row filled by xgrammar (FillThreads: on this thread or split
        across a pool; 2-9 us of one core a row for an extraction schema over GPT-2's vocabulary, 120 us for
        a bounded integer inside a long repetition: scripts/grammar_cost.py), rows without a
        matcher all ones. `before_fill(lo, hi)` runs on this thread before rows lo..hi are filled
        and may set their matchers to None (GrammarSteps: the previous step's tokens). One buffer,
        reused (pinned when uploads are to a GPU): the caller uses it before the next call."""
        if self.workers is not None and before_fill is None:
            return self.workers.step(matchers, None, fill=True)[0]
        rows = len(matchers)
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = torch.empty(max(rows, 64), (self.vocab_size + 31) // 32, dtype=torch.int32,
                                        pin_memory=self.pin_bitmask)
        bitmask = self._bitmask[:rows]
        self._fill(matchers, bitmask, before_fill)
        return bitmask


class FillThreads:
    """xgrammar's bitmask fill on the calling thread, or split across 2, 4, ... up to `threads`
    (the caller and a pool, each filling a contiguous slice of the rows; xgrammar drops the GIL
    while it fills), whichever has been cheapest.

    Splitting pays a fixed cost per call and thread (handing slices to the pool and joining them):
    an extraction schema's rows (~2-9 us each) may fill as fast on one thread or two, a bounded
    integer inside a long repetition (~120-250 us a row) several times faster on eight
    (scripts/grammar_cost.py). Which one a step needs depends on where its rows are in their
    grammars, so each is timed as it runs (a moving average per call) and every `probe_every`th
    fill runs on the choice measured longest ago to keep its figure current. All fill the same
    bits. (xgrammar's own threaded batch fill starts its threads on every call: ~0.2 ms, more than
    64 such rows cost.)"""

    def __init__(self, threads: int, probe_every: int = 32) -> None:
        self.choices = sorted({1, threads} | {c for c in (2, 4) if c < threads})
        self.probe_every = probe_every
        self.seconds: dict[int, float] = {}  # moving average of a fill's time, per choice
        self.last_call: dict[int, int] = {}  # the call that last ran each choice
        self.calls = 0
        self._slices: list = []  # one single-threaded batch matcher per slice
        self._pool: ThreadPoolExecutor | None = None

    def pick(self) -> int:
        self.calls += 1
        unmeasured = [c for c in self.choices if c not in self.seconds]
        if unmeasured:
            choice = unmeasured[0]
        else:
            best = min(self.choices, key=self.seconds.__getitem__)
            others = [c for c in self.choices if c != best]
            probe = others and self.calls % self.probe_every == 0
            choice = min(others, key=lambda c: self.last_call.get(c, 0)) if probe else best
        self.last_call[choice] = self.calls
        return choice

    def __call__(self, matchers: list, bitmask: torch.Tensor, before_fill: Callable[[int, int], None] | None = None) -> None:
        threads = self.pick()
        start = time.perf_counter()
        self.fill_split(threads, matchers, bitmask, before_fill)
        took = time.perf_counter() - start
        last = self.seconds.get(threads)
        self.seconds[threads] = took if last is None else 0.75 * last + 0.25 * took

    def fill_split(self, threads: int, matchers: list, bitmask: torch.Tensor,
                   before_fill: Callable[[int, int], None] | None = None) -> None:
        """Fill row i of `bitmask` from matchers[i] (all ones where it is None) on `threads` (one
        of `choices`): contiguous slices, each handed to the pool as soon as `before_fill` has run
        for it here (so a slice's accepts, which hold the GIL, overlap the fills before it), the
        first slice filled on this thread last."""
        import xgrammar as xgr

        parts = max(1, min(threads, len(matchers)))
        while len(self._slices) < parts:
            self._slices.append(xgr.BatchGrammarMatcher(1))
        if parts > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(max(self.choices) - 1, thread_name_prefix="roseinfer-bitmask")
        bounds = [len(matchers) * j // parts for j in range(parts + 1)]
        pending = []
        for j in [*range(1, parts), 0]:
            lo, hi = bounds[j], bounds[j + 1]
            if before_fill is not None:
                before_fill(lo, hi)
            rows = [i for i in range(lo, hi) if matchers[i] is not None]
            if len(rows) < hi - lo:  # xgrammar writes whole rows: only the unconstrained ones need ones
                bitmask[[i for i in range(lo, hi) if matchers[i] is None]] = -1
            if not rows:
                continue
            fill = (self._slices[j].batch_fill_next_token_bitmask, [matchers[i] for i in rows], bitmask, rows)
            if j:
                pending.append(self._pool.submit(*fill))
            else:
                fill[0](*fill[1:])
        for future in pending:
            future.result()


class GrammarSteps:
    """The grammar side of a multi-step decode run with constrained rows (ModelRunner.
    execute_decode_steps): each step's bitmask from the rows' matchers, and each step's tokens fed
    back to them before the next. A row leaves the run's grammar when its matcher terminates (it
    took its stop token) or rejects a token; `ends[row]` is then how many of the run's tokens
    the row keeps, and its later tokens, sampled unconstrained, are dropped by the engine."""

    def __init__(self, outputs: StructuredOutputs, matchers: list) -> None:
        self._outputs = outputs
        self._matchers = list(matchers)  # None: an unconstrained row, or one whose grammar ended
        self._steps = 0
        self.ends: dict[int, int] = {}
        self._plan = None  # engine.grammar_workers.StepPlan, with grammar workers

    def fill(self, tokens: list[int] | None = None) -> torch.Tensor:
        """The next step's bitmask. `tokens`: the step before's, not yet taken: each slice of rows
        takes its tokens (accept) just before its fill is handed to a thread, so with several fill
        threads the accepts overlap the fills."""
        if tokens is None:
            return self._outputs.fill_bitmask(self._matchers)
        self._steps += 1
        workers = self._outputs.workers
        if workers is not None:  # the matchers' processes take the tokens and fill, in parallel
            bitmask, statuses = workers.step(self._matchers, tokens, fill=True, plan=self._plan_for(workers))
            self._end_rows(statuses, tokens)
            return bitmask
        return self._outputs.fill_bitmask(self._matchers, lambda lo, hi: self._accept_rows(tokens, lo, hi))

    def continued(self) -> GrammarSteps:
        """The grammar side of the next run of the same batch: rows whose grammar ended stay
        unconstrained there (their requests end when this run's outputs are processed)."""
        return GrammarSteps(self._outputs, self._matchers)

    def accept(self, tokens: list[int]) -> None:
        """A step's tokens, one a row, taken by the rows' matchers (fill(tokens) does this too)."""
        self._steps += 1
        workers = self._outputs.workers
        if workers is not None:
            self._end_rows(workers.step(self._matchers, tokens, fill=False, plan=self._plan_for(workers))[1], tokens)
            return
        self._accept_rows(tokens, 0, len(self._matchers))

    def _plan_for(self, workers):
        """Which rows go to which grammar worker, kept while no row leaves."""
        if self._plan is None:
            self._plan = workers.plan(self._matchers)
        return self._plan

    def _end_rows(self, statuses: list[int], tokens: list[int]) -> None:
        """The workers' verdicts on a step's tokens (engine.grammar_workers): rows whose grammar
        rejected its token or ended leave the run's grammar, as in _accept_rows."""
        for j, status in enumerate(statuses):
            if status != ACCEPTED and self._matchers[j] is not None:
                if status == REJECTED:
                    logger.warning("token %d rejected by its grammar inside a decode run", tokens[j])
                self.ends[j] = self._steps
                self._matchers[j] = None
                self._plan = None

    def _accept_rows(self, tokens: list[int], lo: int, hi: int) -> None:
        # A call a row: xgrammar's batch accept converts its result row by row through tvm-ffi's
        # containers and, with an is_terminated call a row, cost 1.7x this on the CPU box (64
        # rows of the records schema; scripts/grammar_cost.py). A matcher
        # (terminate_without_stop_token off) ends only on taking a stop token.
        stops = self._outputs.stop_token_set
        for j in range(lo, hi):
            matcher = self._matchers[j]
            if matcher is None:
                continue
            token = tokens[j]
            ok = matcher.accept_token(token)
            if not ok:  # the mask allows only tokens the matcher accepts
                logger.warning("token %d rejected by its grammar inside a decode run", token)
            if not ok or (token in stops and matcher.is_terminated()):
                self.ends[j] = self._steps
                self._matchers[j] = None


def grammar_compiler(token_bytes: list[bytes], vocab_size: int, stop_token_ids: list[int], threads: int):
    """An xgrammar GrammarCompiler over a byte-level vocabulary (padded with empty tokens up to
    `vocab_size`), its own cache off: the callers keep bounded ones."""
    import xgrammar as xgr

    vocab = list(token_bytes[:vocab_size])
    vocab += [b""] * (vocab_size - len(vocab))
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
    return xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)


def compile_spec(compiler, spec: StructuredOutputSpec):
    """`spec` compiled by an xgrammar GrammarCompiler; InvalidRequest if it is not valid."""
    try:
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
        if spec.kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.value)
        if spec.kind == "choice":
            return compiler.compile_grammar(choice_ebnf(json.loads(spec.value)))
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.value)
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's errors for bad input
        raise InvalidRequest(f"invalid {spec.kind.replace('_', ' ')}: {_first_line(exc)}",
                             param=_PARAM.get(spec.kind)) from None
    raise InvalidRequest(f"unknown structured output kind {spec.kind!r}")


_PARAM = {"json_schema": "response_format", "json_object": "response_format", "regex": "guided_regex",
          "choice": "guided_choice", "grammar": "guided_grammar"}


def _first_line(exc: Exception) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", line)[:300]


def choice_ebnf(options: list[str]) -> str:
    """An EBNF grammar matching exactly one of `options`."""
    return "root ::= " + " | ".join(json.dumps(o) for o in options)
