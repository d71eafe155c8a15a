"""Constrained decoding's grammar work in worker processes, each owning the matchers of a share of
the requests.

A constrained step's host work is xgrammar's token accept (~1.2-2.5 us a row, holding the GIL)
and its bitmask fill (~3 us a row for an extraction schema over GPT-2's vocabulary, dropping the
GIL). In one process the accepts of a 64-row batch run one after another however many threads
there are, and a fill thread waits for the GIL the accepting thread holds, so the step thread's
grammar work stayed longer than GPT-2's whole forward on an H100/H200 (constrained decode at
0.66-0.77 of free, docs/BENCHMARKS.md). Here each of N processes holds its requests' matchers;
a step posts each process its rows (row, slot, token to accept) in shared memory, and each
accepts and fills its rows into one shared-memory bitmask (pinned for the upload where CUDA
allows), in parallel; the engine's step thread only posts and waits.

Each request gets a slot (an integer) on the least loaded worker when its grammar has compiled in
the engine process (which also validated it); the worker compiles the same spec itself (cached by
spec) and keeps the matcher until the request ends. Only worth it with cores to spare (a worker
spins on a core while constrained requests decode): the engine turns it on for CUDA hosts with
8 or more cores (EngineConfig.grammar_workers).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time
import weakref
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

import torch

from engine.sampling_params import StructuredOutputSpec
from engine.structured_output import ACCEPTED, REJECTED, TERMINATED, StructuredOutputs
from roseinfer_kernels.precompile import spawn_without_main

logger = logging.getLogger(__name__)

def default_grammar_workers(device_type: str, cpus: int | None = None) -> int:
    """Grammar worker processes by default: a quarter of the cores of a CUDA host, at most four
    (on the 16-core H200 host, GPT-2's seed workload held to the records schema, 64 rows: a step
    took 710 us on 2 workers and 654 on 4 against a free step's 577, `scripts/grammar_step_parts.py`;
    docs/BENCHMARKS.md); none on a host under 8 cores, nor on the CPU, whose cores run the model."""
    cpus = cpus or os.cpu_count() or 1
    return min(4, cpus // 4) if device_type == "cuda" and cpus >= 8 else 0


class RemoteMatcher:
    """A request's matcher as the engine holds it: where it lives. Its tokens reach it only through
    `GrammarWorkers.step` (a constrained run's steps, and a single step's rows all at once:
    LLMEngine._grammar_ends_of_step)."""

    __slots__ = ("slot", "worker")

    def __init__(self, slot: int, worker: int) -> None:
        self.slot, self.worker = slot, worker


class SpawnedWorkers:
    """Grammar worker processes started before the engine loads its model: a worker imports torch
    and xgrammar first (about 4 s on a fresh H200 host), then waits on its pipe for `GrammarWorkers`
    to hand it the vocabulary and the shared memory, so that by the time the engine is ready they
    are too. Their arguments are only a pipe and an index: a spawn argument is pickled into the
    spawn pipe, and one larger than its buffer (the vocabulary's bytes were a megabyte) made each
    start wait for that child's imports, one after another (16 s of the 8B's ready time for 4
    workers; docs/BENCHMARKS.md, seventeenth session)."""

    def __init__(self, workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork is unsafe once CUDA has started
        self.conns: list[Connection] = []
        self.procs = []
        for i in range(workers):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"roseinfer-grammar-{i}", daemon=True, args=(theirs, i))
            with spawn_without_main():
                proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)

    @classmethod
    def ahead(cls, workers: int) -> SpawnedWorkers | None:
        """`workers` processes (None if 0, or if this process is daemonic and may not start any)."""
        if workers < 1:
            return None
        if multiprocessing.current_process().daemon:  # (engine.engine_process starts it non-daemonic when needed)
            logger.warning("grammar workers: a daemonic process may not start them; grammars run in this process")
            return None
        return cls(workers)

    def close(self) -> None:
        """Stop processes that were never set up (the engine failed to start, or has no grammars to run)."""
        GrammarWorkers._shut(self.conns, self.procs, [], [])


class GrammarWorkers:
    """`workers` processes holding matchers; `step` accepts a step's tokens and fills its bitmask
    rows across them. Rows whose matcher is None (unconstrained) are all ones.

    A step is posted through shared memory, not the pipe: a round trip through a pipe cost 40-65
    us on the H200 host (the worker's wake-up, then the engine's), as much as 16 rows' grammar work
    (H200, docs/BENCHMARKS.md). The engine writes each worker's rows (row, slot, token) and then a
    new sequence number; the worker, which spins on it for SPIN_S after its last job, runs the rows
    and writes its sequence number back, which the engine spins on. A worker idle for longer
    blocks on its pipe, saying so in shared memory, and the engine then also wakes it through the
    pipe. The pipe carries everything else (new matchers, released ones, exit), which the worker
    reads before each job. Stores are ordered as x86 orders them (the payload before the sequence
    number); these hosts are x86."""

    def __init__(self, token_bytes: list[bytes], vocab_size: int, stop_token_ids: tuple[int, ...],
                 spawned: SpawnedWorkers, max_rows: int, pin: bool = False,
                 cache_limit_bytes: int = 256 * 2**20) -> None:
        workers = len(spawned.procs)
        self.words = (vocab_size + 31) // 32
        self.max_rows = max_rows
        self._shm = SharedMemory(create=True, size=max_rows * self.words * 4)
        self.bitmask = torch.frombuffer(self._shm.buf, dtype=torch.int32).view(max_rows, self.words)
        self._ctl_shm = SharedMemory(create=True, size=_Control.nbytes(workers, max_rows))
        self._ctl = _Control(self._ctl_shm.buf, workers, max_rows)
        self._vocab_shm = _share_token_bytes(token_bytes)  # a megabyte for a 128k vocabulary
        # The pinned range (at most one), unregistered by _shut: CUDA keeps a registration after
        # the memory is unmapped, and the next engine's segment, often mapped at the same address,
        # could then not be pinned.
        self._pinned: list[int] = []
        if pin and torch.cuda.is_available() and _pin(self.bitmask.data_ptr(), self._shm.size):
            self._pinned.append(self.bitmask.data_ptr())
        self._conns, self._procs = spawned.conns, spawned.procs
        for conn in self._conns:
            conn.send(("setup", workers, self._shm.name, self._ctl_shm.name, max_rows, self.words,
                       self._vocab_shm.name, len(token_bytes), vocab_size, tuple(stop_token_ids), cache_limit_bytes))
        self._load = [0] * workers  # live matchers per worker
        self._slots = itertools.count()
        self._finalizer = weakref.finalize(self, GrammarWorkers._shut, self._conns, self._procs,
                                           [self._shm, self._ctl_shm, self._vocab_shm], self._pinned)

    @staticmethod
    def _shut(conns: list[Connection], procs: list, segments: list[SharedMemory], pinned: list[int]) -> None:
        while pinned:
            torch.cuda.cudart().cudaHostUnregister(pinned.pop())
        for conn in conns:
            try:
                conn.send(("exit",))
            except OSError:
                pass
        for proc in procs:
            proc.join(timeout=2)
            if proc.is_alive():  # (one spawned ahead may still be importing, its pipe unread)
                proc.kill()
                proc.join()  # reaped: a killed process reads as alive until then
        for shm in segments:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass

    @classmethod
    def start(cls, outputs: StructuredOutputs, workers: int | SpawnedWorkers | None, max_rows: int) -> GrammarWorkers | None:
        """Grammar workers for `outputs`' vocabulary, attached to it: `workers` processes, or those
        spawned ahead (None if there are none, or the vocabulary is not byte-level: then there is no
        grammar to run, and processes spawned ahead are stopped)."""
        spawned = SpawnedWorkers.ahead(workers) if isinstance(workers, int) else workers
        if spawned is None:
            return None
        if outputs.token_bytes is None:
            spawned.close()
            return None
        started = cls(outputs.token_bytes, outputs.vocab_size, tuple(outputs.stop_token_ids), spawned, max_rows,
                      pin=outputs.pin_bitmask, cache_limit_bytes=outputs.cache_limit_bytes)
        outputs.attach_workers(started)
        return started

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until every worker has its vocabulary's grammar compiler (xgrammar's tokenizer info, about
        half a second for a 128k vocabulary), so that the first constrained request does not wait
        for a worker's start-up."""
        deadline = time.monotonic() + timeout_s
        for worker, proc in enumerate(self._procs):
            while not self._ctl.ctl[worker, _Control.READY]:
                if not proc.is_alive():
                    raise RuntimeError(f"grammar worker {worker} died while starting (exit code {proc.exitcode})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"grammar worker {worker} did not start within {timeout_s:.0f} s")
                time.sleep(1e-3)

    def add(self, spec: StructuredOutputSpec) -> RemoteMatcher:
        """A new matcher for `spec` on the least loaded worker, which compiles it on a thread of its
        own unless cached (the engine adds it as the request arrives, beside its own compile, so by
        admission it is there; meanwhile the steps of the rows that worker holds go on: a compile
        takes 8-20 ms for an extraction schema, 0.75 s for a 1000-field one on the build box)."""
        worker = min(range(len(self._conns)), key=self._load.__getitem__)
        matcher = RemoteMatcher(next(self._slots), worker)
        self._load[worker] += 1
        self._conns[worker].send(("add", matcher.slot, spec.kind, spec.value))
        return matcher

    def remove(self, matcher: RemoteMatcher) -> None:
        if matcher.slot < 0:
            return
        self._load[matcher.worker] -= 1
        self._conns[matcher.worker].send(("remove", matcher.slot))
        matcher.slot = -1

    def plan(self, matchers: list[RemoteMatcher | None]) -> StepPlan:
        return StepPlan(matchers)

    def step(self, matchers: list[RemoteMatcher | None], tokens: list[int] | None, fill: bool,
             plan: StepPlan | None = None) -> tuple[torch.Tensor | None, list[int]]:
        """Row i's matcher takes tokens[i] (if `tokens`), then (if `fill`) fills bitmask row i; a
        row without a matcher, or whose matcher rejected its token or ended, is all ones. Returns
        the bitmask's first len(matchers) rows (valid until the next call; None without `fill`)
        and each row's ACCEPTED / TERMINATED / REJECTED (ACCEPTED for rows without a matcher).
        `plan`: `self.plan(matchers)`, kept by a caller that steps the same matchers again."""
        import numpy as np

        plan = plan or StepPlan(matchers)
        assert plan.rows == len(matchers) <= self.max_rows
        ctl = self._ctl
        token_ids = None if tokens is None else np.asarray(tokens, dtype=np.int64)
        for worker, rows, slots in plan.per_worker:
            if ctl.post(worker, rows, slots, -1 if token_ids is None else token_ids[rows], fill):
                self._conns[worker].send(("wake",))  # it was blocked on its pipe
        if fill and plan.free:
            self.bitmask[plan.free] = -1
        statuses = np.zeros(plan.rows, dtype=np.int32)  # ACCEPTED
        for worker, rows, _ in plan.per_worker:
            self._wait(worker)
            statuses[rows] = ctl.status[worker, :len(rows)]
        return (self.bitmask[:plan.rows] if fill else None), statuses.tolist()

    def _wait(self, worker: int) -> None:
        """Until `worker` has run its posted job: spinning for a while (the job is tens of
        microseconds), then sleeping in short naps, checking that the worker lives."""
        ctl = self._ctl
        spin_until = time.perf_counter() + 2e-3
        while not ctl.done(worker):
            if time.perf_counter() > spin_until:
                time.sleep(20e-6)
                if not self._procs[worker].is_alive():
                    raise RuntimeError(f"grammar worker {worker} died (exit code {self._procs[worker].exitcode})")

    def close(self) -> None:
        """Stop the workers and free the shared memory (also when the engine is collected)."""
        self._finalizer()


def _share_token_bytes(token_bytes: list[bytes]) -> SharedMemory:
    """Every token's bytes in one shared segment: the end offsets (int64, one a token), then the bytes."""
    import numpy as np

    ends = np.cumsum([len(b) for b in token_bytes], dtype=np.int64)
    blob = b"".join(token_bytes)
    shm = SharedMemory(create=True, size=max(1, ends.nbytes + len(blob)))
    shm.buf[:ends.nbytes] = ends.tobytes()
    shm.buf[ends.nbytes:ends.nbytes + len(blob)] = blob
    return shm


def _read_token_bytes(name: str, count: int) -> list[bytes]:
    """`_share_token_bytes`' table, read back (a copy: the segment is closed again)."""
    import numpy as np

    shm = SharedMemory(name=name)
    try:
        ends = np.frombuffer(shm.buf, dtype=np.int64, count=count).tolist()
        blob = bytes(shm.buf[8 * count:8 * count + (ends[-1] if ends else 0)])
    finally:
        shm.close()
    return [blob[start:end] for start, end in zip([0] + ends[:-1], ends)]


def _pin(address: int, size: int) -> bool:
    """Page-lock host memory in place (cudaHostRegister), so that uploads from it are asynchronous
    DMAs as from any pinned buffer (else each copies through a staging buffer first)."""
    err = torch.cuda.cudart().cudaHostRegister(address, size, 0)
    if int(err) == 0:
        return True
    # CUDA keeps a failed call's error as its last error, which torch's next kernel-launch check
    # would raise as that launch's own: consume it with a launch here.
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError:
        pass
    logger.info("grammar workers: the shared bitmask could not be pinned (%s)", err)
    return False


class StepPlan:
    """Which rows of a step each worker takes, as index arrays: built once for a batch's matchers
    and reused while they stay (GrammarSteps makes a new one when a row leaves its grammar), so a
    step's host work does not loop over the rows in Python."""

    def __init__(self, matchers: list[RemoteMatcher | None]) -> None:
        import numpy as np

        self.rows = len(matchers)
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for i, m in enumerate(matchers):
            if m is not None:
                rows, slots = groups.setdefault(m.worker, ([], []))
                rows.append(i)
                slots.append(m.slot)
        self.per_worker = [(w, np.array(rows, dtype=np.int64), np.array(slots, dtype=np.int64))
                           for w, (rows, slots) in groups.items()]
        self.free = [i for i, m in enumerate(matchers) if m is None]


class _Control:
    """The shared-memory job slots: per worker a control row (posted and done sequence numbers,
    the job's row count and fill flag, whether the worker sleeps on its pipe; 64 bytes, one cache
    line a worker) and its job's rows, slots, tokens and statuses."""

    POSTED, DONE, COUNT, FILL, SLEEPING, READY = range(6)

    @staticmethod
    def nbytes(workers: int, max_rows: int) -> int:
        return workers * (64 + max_rows * (4 + 8 + 8 + 4))

    def __init__(self, buf, workers: int, max_rows: int) -> None:
        import numpy as np

        offset = 0

        def take(dtype, cols: int):
            nonlocal offset
            arr = np.ndarray((workers, cols), dtype=dtype, buffer=buf, offset=offset)
            offset += arr.nbytes
            return arr

        self.ctl = take(np.int64, 8)
        self.slots = take(np.int64, max_rows)
        self.tokens = take(np.int64, max_rows)
        self.rows = take(np.int32, max_rows)
        self.status = take(np.int32, max_rows)

    def post(self, worker: int, rows, slots, tokens, fill: bool) -> bool:
        """Write a job for `worker`, then publish it; True if the worker sleeps on its pipe."""
        n = len(rows)
        self.rows[worker, :n] = rows
        self.slots[worker, :n] = slots
        self.tokens[worker, :n] = tokens
        ctl = self.ctl[worker]
        ctl[self.COUNT] = n
        ctl[self.FILL] = fill
        ctl[self.POSTED] += 1  # last: the payload's stores are visible before it
        return bool(ctl[self.SLEEPING])

    def done(self, worker: int) -> bool:
        ctl = self.ctl[worker]
        return ctl[self.DONE] == ctl[self.POSTED]

    def release(self) -> None:
        self.ctl = self.slots = self.tokens = self.rows = self.status = None


# How long an idle worker keeps spinning on its control row before it blocks on its pipe: longer
# than the gap between two steps of a decoding batch.
SPIN_S = 5e-3


def _worker_main(conn: Connection, index: int) -> None:
    """A grammar worker: imports xgrammar, waits for its set-up (GrammarWorkers), then compiles specs
    (cached; on a thread, which xgrammar runs without the GIL, so that jobs for the rows it holds go
    on meanwhile), keeps matchers by slot, and runs the jobs posted on its control row."""
    from concurrent.futures import Future

    import xgrammar as xgr

    try:
        setup = conn.recv()
    except (EOFError, OSError):  # the engine process is gone
        return
    if setup[0] != "setup":  # stopped before it was set up
        return
    (_, workers, shm_name, ctl_name, max_rows, words, vocab_name, vocab_count, vocab_size, stop_token_ids,
     cache_limit_bytes) = setup

    # (spawned: the engine's resource tracker, which the engine's unlink clears)
    shm, ctl_shm = SharedMemory(name=shm_name), SharedMemory(name=ctl_name)
    bitmask = torch.frombuffer(shm.buf, dtype=torch.int32).view(max_rows, words)
    control = _Control(ctl_shm.buf, workers, max_rows)
    ctl = control.ctl[index]
    # Compiles run on its one thread, cached as the engine caches them (bound and order).
    token_bytes = _read_token_bytes(vocab_name, vocab_count)
    grammars = StructuredOutputs(token_bytes, vocab_size, stop_token_ids, threads=1, cache_limit_bytes=cache_limit_bytes)
    grammars.prepare()  # its compiler, before the first request
    ctl[_Control.READY] = 1
    matchers: dict[int, object] = {}
    waiting: dict[int, tuple[str, Future]] = {}  # slots added while their grammar compiles: (kind, its compile)
    batch = xgr.BatchGrammarMatcher(1)
    stops = frozenset(stop_token_ids)

    def make_matcher(slot: int) -> None:
        """A waiting slot's matcher, once its grammar has compiled (this waits for it)."""
        kind, compiling = waiting.pop(slot)
        try:
            matchers[slot] = xgr.GrammarMatcher(compiling.result())
        except Exception as exc:  # noqa: BLE001 - its rows then report REJECTED (the engine's compile fails it first)
            logger.warning("grammar worker: a %s spec did not compile: %s", kind, exc)

    def settle() -> None:
        """Matchers for the waiting slots whose grammar has compiled meanwhile."""
        for slot, (_, compiling) in list(waiting.items()):
            if compiling.done():
                make_matcher(slot)

    def handle(msg) -> bool:
        """A pipe message; False on exit."""
        if msg[0] == "add":
            _, slot, kind, value = msg
            waiting[slot] = (kind, grammars.compile_async(StructuredOutputSpec(kind, value)))
            settle()
        elif msg[0] == "remove":
            matchers.pop(msg[1], None)
            waiting.pop(msg[1], None)
        return msg[0] != "exit"

    def run_job(n: int, fill: bool) -> None:
        fill_rows, fill_matchers, open_rows = [], [], []
        statuses = []
        for row, slot, token in zip(control.rows[index, :n].tolist(), control.slots[index, :n].tolist(),
                                    control.tokens[index, :n].tolist()):
            if slot in waiting:  # its grammar is still compiling (the engine's compile was faster)
                make_matcher(slot)
            matcher = matchers.get(slot)
            status = ACCEPTED if matcher is not None else REJECTED
            if matcher is not None and token >= 0:
                if not matcher.accept_token(token):
                    status = REJECTED
                elif token in stops and matcher.is_terminated():
                    status = TERMINATED
            statuses.append(status)
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
        control.status[index, :n] = statuses

    last = int(ctl[_Control.DONE])  # a job posted before this worker got here is pending
    idle_since = time.perf_counter()
    spins = 0
    running = True
    try:
        while running:
            posted = int(ctl[_Control.POSTED])
            if posted != last:
                while conn.poll():  # new matchers before the job that uses them
                    running = handle(conn.recv()) and running
                n, fill = int(ctl[_Control.COUNT]), bool(ctl[_Control.FILL])
                try:
                    run_job(n, fill)
                except Exception:  # noqa: BLE001 - the rows' grammars end; the engine goes on
                    logger.exception("grammar worker: a step failed")
                    control.status[index, :n] = REJECTED
                    if fill:
                        bitmask[control.rows[index, :n].tolist()] = -1
                last = posted
                ctl[_Control.DONE] = posted
                idle_since = time.perf_counter()
                continue
            spins += 1
            if spins % 256 == 0:  # now and then: the pipe (exit, new matchers) and the idle time
                while conn.poll():
                    running = handle(conn.recv()) and running
                settle()
                if time.perf_counter() - idle_since > SPIN_S:  # asleep on the pipe until a job
                    ctl[_Control.SLEEPING] = 1
                    while running and int(ctl[_Control.POSTED]) == last:
                        # the engine's wake-up or a message; and every 2 ms a look at the control row
                        # (two stores and two loads can cross: a job posted as this worker fell asleep
                        # waits that long)
                        while running and conn.poll(2e-3):
                            running = handle(conn.recv())
                    ctl[_Control.SLEEPING] = 0
                    idle_since = time.perf_counter()
    except (EOFError, OSError):  # the engine process is gone
        pass
    bitmask = ctl = None
    control.release()
    shm.close()
    ctl_shm.close()
