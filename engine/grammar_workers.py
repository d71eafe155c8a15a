"""Constrained decoding's grammar work in worker processes, each owning the matchers of a share of
the requests.

A constrained step's host work is xgrammar's token accept (~1.2-2.5 us a row, holding the GIL)
and its bitmask fill (~3 us a row for an extraction schema over GPT-2's vocabulary, dropping the
GIL). In one process the accepts of a 64-row batch run one after another however many threads
there are, and a fill thread waits for the GIL the accepting thread holds, so the step thread's
grammar work stayed longer than GPT-2's whole forward on an H100/H200 (constrained decode at
0.66-0.77 of free, docs/BENCHMARKS.md). Here each of N processes holds its requests' matchers;
a step sends each process its rows (row, slot, token to accept), and each accepts and fills its
rows into one shared-memory bitmask (pinned for the upload where CUDA allows), in parallel; the
engine's step thread only sends and waits (the wait drops the GIL).

Each request gets a slot (an integer) on the least loaded worker when its grammar has compiled in
the engine process (which also validated it); the worker compiles the same spec itself (cached by
spec) and keeps the matcher until the request ends. Only worth it with cores to spare: the engine
turns it on for CUDA hosts with 8 or more cores (EngineConfig.grammar_workers).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory

import torch

from engine.sampling_params import StructuredOutputSpec
from engine.structured_output import ACCEPTED, REJECTED, TERMINATED, StructuredOutputs, compile_spec

logger = logging.getLogger(__name__)

def default_grammar_workers(device_type: str, cpus: int | None = None) -> int:
    """Grammar worker processes by default: on a CUDA host with 8+ cores, one per 4 cores up to 4
    (64 rows of ~5 us each is ~80 us a step on 4); none on the CPU, whose cores run the model."""
    cpus = cpus or os.cpu_count() or 1
    return min(4, cpus // 4) if device_type == "cuda" and cpus >= 8 else 0


class RemoteMatcher:
    """A request's matcher as the engine holds it: where it lives. `accept_token` and
    `is_terminated` (the engine's single-step path) are one round trip each to its worker."""

    __slots__ = ("workers", "slot", "worker", "terminated")

    def __init__(self, workers: GrammarWorkers, slot: int, worker: int) -> None:
        self.workers, self.slot, self.worker = workers, slot, worker
        self.terminated = False

    def accept_token(self, token: int) -> bool:
        status = self.workers.step([self], [token], fill=False)[1][0]
        self.terminated = status == TERMINATED
        return status != REJECTED

    def is_terminated(self) -> bool:
        return self.terminated


class GrammarWorkers:
    """`workers` processes holding matchers; `step` accepts a step's tokens and fills its bitmask
    rows across them. Rows whose matcher is None (unconstrained) are all ones."""

    def __init__(self, token_bytes: list[bytes], vocab_size: int, stop_token_ids: tuple[int, ...], workers: int,
                 max_rows: int, pin: bool = False) -> None:
        self.words = (vocab_size + 31) // 32
        self.max_rows = max_rows
        self._shm = SharedMemory(create=True, size=max_rows * self.words * 4)
        self.bitmask = torch.frombuffer(self._shm.buf, dtype=torch.int32).view(max_rows, self.words)
        self._registered = False
        if pin and torch.cuda.is_available():
            # Page-locked in place, so the masked step's upload is an asynchronous DMA as from any
            # pinned buffer (else the upload copies through a staging buffer first).
            err = torch.cuda.cudart().cudaHostRegister(self.bitmask.data_ptr(), self._shm.size, 0)
            self._registered = int(err) == 0
            if not self._registered:
                logger.info("grammar workers: the shared bitmask could not be pinned (%s)", err)
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once CUDA has started
        self._conns: list[Connection] = []
        self._procs = []
        for i in range(workers):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"roseinfer-grammar-{i}", daemon=True,
                               args=(theirs, self._shm.name, max_rows, self.words, token_bytes, vocab_size,
                                     tuple(stop_token_ids)))
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
        self._load = [0] * workers  # live matchers per worker
        self._slots = itertools.count()
        self._finalizer = weakref.finalize(self, GrammarWorkers._shut, self._conns, self._procs, self._shm)

    @staticmethod
    def _shut(conns: list[Connection], procs: list, shm: SharedMemory) -> None:
        for conn in conns:
            try:
                conn.send(("exit",))
            except OSError:
                pass
        for proc in procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass

    @classmethod
    def start(cls, outputs: StructuredOutputs, workers: int, max_rows: int) -> GrammarWorkers | None:
        """`workers` processes for `outputs`' vocabulary, attached to it (None if 0 or the
        vocabulary is not byte-level: then there is no grammar to run)."""
        if workers < 1 or outputs.token_bytes is None:
            return None
        if multiprocessing.current_process().daemon:  # (engine.engine_process starts it non-daemonic when needed)
            logger.warning("grammar workers: a daemonic process may not start them; grammars run in this process")
            return None
        started = cls(outputs.token_bytes, outputs.vocab_size, tuple(outputs.stop_token_ids), workers, max_rows,
                      pin=outputs.pin_bitmask)
        outputs.attach_workers(started)
        return started

    def add(self, spec: StructuredOutputSpec) -> RemoteMatcher:
        """A new matcher for `spec` (already validated) on the least loaded worker."""
        worker = min(range(len(self._conns)), key=self._load.__getitem__)
        matcher = RemoteMatcher(self, next(self._slots), worker)
        self._load[worker] += 1
        self._conns[worker].send(("add", matcher.slot, spec.kind, spec.value))
        return matcher

    def remove(self, matcher: RemoteMatcher) -> None:
        if matcher.slot < 0:
            return
        self._load[matcher.worker] -= 1
        self._conns[matcher.worker].send(("remove", matcher.slot))
        matcher.slot = -1

    def step(self, matchers: list[RemoteMatcher | None], tokens: list[int] | None, fill: bool
             ) -> tuple[torch.Tensor | None, list[int]]:
        """Row i's matcher takes tokens[i] (if `tokens`), then (if `fill`) fills bitmask row i; a
        row without a matcher, or whose matcher rejected its token or ended, is all ones. Returns
        the bitmask's first len(matchers) rows (valid until the next call; None without `fill`)
        and each row's ACCEPTED / TERMINATED / REJECTED (ACCEPTED for rows without a matcher)."""
        rows = len(matchers)
        assert rows <= self.max_rows
        per_worker: dict[int, list[tuple[int, int, int]]] = {}
        for i, m in enumerate(matchers):
            if m is not None:
                per_worker.setdefault(m.worker, []).append((i, m.slot, -1 if tokens is None else tokens[i]))
        for worker, work in per_worker.items():
            self._conns[worker].send(("step", work, fill))
        statuses = [ACCEPTED] * rows
        if fill:
            free = [i for i, m in enumerate(matchers) if m is None]
            if free:
                self.bitmask[free] = -1
        pending = {self._conns[w]: w for w in per_worker}
        while pending:
            for conn in wait(list(pending)):
                del pending[conn]
                reply = conn.recv()
                if isinstance(reply, BaseException):
                    raise RuntimeError("a grammar worker failed") from reply
                for i, status in reply:
                    statuses[i] = status
        return (self.bitmask[:rows] if fill else None), statuses

    def close(self) -> None:
        """Stop the workers and free the shared bitmask (also when the engine is collected)."""
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.bitmask.data_ptr())
            self._registered = False
        self._finalizer()


def _worker_main(conn: Connection, shm_name: str, max_rows: int, words: int, token_bytes: list[bytes],
                 vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
    """A grammar worker: compiles specs (cached), keeps matchers by slot, and runs steps."""
    import xgrammar as xgr

    shm = SharedMemory(name=shm_name)  # (spawned: the engine's resource tracker, which its unlink clears)
    bitmask = torch.frombuffer(shm.buf, dtype=torch.int32).view(max_rows, words)
    vocab = list(token_bytes[:vocab_size]) + [b""] * max(0, vocab_size - len(token_bytes))
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiled: dict[tuple[str, str], object] = {}
    matchers: dict[int, object] = {}
    batch = xgr.BatchGrammarMatcher(1)
    stops = frozenset(stop_token_ids)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the engine process is gone
            break
        try:
            if msg[0] == "step":
                _, work, fill = msg
                reply, fill_rows, fill_matchers, open_rows = [], [], [], []
                for row, slot, token in work:
                    matcher = matchers.get(slot)
                    status = ACCEPTED if matcher is not None else REJECTED
                    if matcher is not None and token >= 0:
                        if not matcher.accept_token(token):
                            status = REJECTED
                        elif token in stops and matcher.is_terminated():
                            status = TERMINATED
                    reply.append((row, status))
                    if status == ACCEPTED:
                        fill_rows.append(row)
                        fill_matchers.append(matcher)
                    else:
                        open_rows.append(row)
                if fill:
                    if fill_rows:
                        batch.batch_fill_next_token_bitmask(fill_matchers, bitmask, fill_rows)
                    if open_rows:
                        bitmask[open_rows] = -1
                conn.send(reply)
            elif msg[0] == "add":
                _, slot, kind, value = msg
                key = (kind, value)
                if key not in compiled:
                    if len(compiled) >= 64:  # a bound, as the engine's own cache has
                        compiled.pop(next(iter(compiled)))
                    compiled[key] = compile_spec(compiler, StructuredOutputSpec(kind, value))
                matchers[slot] = xgr.GrammarMatcher(compiled[key])
            elif msg[0] == "remove":
                matchers.pop(msg[1], None)
            elif msg[0] == "exit":
                break
        except Exception as exc:  # noqa: BLE001 - reported to the engine, which raises it
            logger.exception("grammar worker")
            if msg[0] == "step":
                conn.send(exc)
    bitmask = None
    shm.close()
