"""The engine core in its own process, behind the interface AsyncEngine drives (vLLM v1's split).

In one process the HTTP handlers (request parsing, SSE JSON, socket writes) and the engine's
host work share one GIL; at a few hundred concurrent streams the event loop alone keeps a core
busy and the engine thread waits for the GIL while the GPU idles. Here the child process owns
the model, the scheduler and the KV cache and steps as fast as the device allows; the API
process keeps tokenization, validation and the streams.

Protocol: per API process, two one-way pipes, each written by its own sender thread so that
neither the event loop nor the engine's step loop ever blocks on a full pipe. Commands to the
engine, in lists of whatever queued up: ("add", Sequence), ("abort", request_id), ("stop", None).
Results from it: ("ready", EngineInfo) or ("error", kind, message) once at start-up; then
("step", outputs as tuples, StepStats, (our running, others' waiting)) after every step, and
after every batch of commands applied while idle (so aborts show up in the gauges at once);
("stopped",) last, in answer to "stop".

Several API processes (`roseinfer serve --api-server-count N`, as vLLM's option of that name) share
one engine process, each over its own pair of pipes: the engine remembers which pipe each request
came from and sends each API process the outputs of its own requests and the gauges of all.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection, wait
from operator import attrgetter

from engine.config import LOG_FORMAT, EngineConfig, ModelConfig
from engine.errors import EngineDead, EngineError, InvalidRequest
from engine.llm_engine import LLMEngine, RequestOutput, StepStats, build_sequence
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class EngineInfo:
    """What the API process needs from the loaded engine."""

    tokenizer: object
    model_config: ModelConfig
    max_model_len: int
    stats: StepStats


_OUTPUT_FIELDS = attrgetter(*(f.name for f in fields(RequestOutput)))


def _pack(outputs: list[RequestOutput]) -> list[tuple]:
    """Outputs as plain tuples: pickling 256 dataclasses and rebuilding them on the other side cost
    about 2 ms a step on the CPU here, tuples about 0.3 ms."""
    return [_OUTPUT_FIELDS(out) for out in outputs]


def _unpack(packed: list[tuple]) -> list[RequestOutput]:
    return [RequestOutput(*fields_) for fields_ in packed]


class _Reporter:
    """Sends results from the engine process without ever blocking its step loop: the engine
    thread pickles, a sender thread writes (and waits while the API process is slow to read)."""

    def __init__(self, results: Connection) -> None:
        self.results = results
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="roseinfer-engine-results", daemon=True)
        self.thread.start()

    def send(self, msg: tuple) -> None:
        self.outbox.put(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def _run(self) -> None:
        while (data := self.outbox.get()) is not None:
            try:
                self.results.send_bytes(data)
            except (BrokenPipeError, OSError):  # the API process went away
                return

    def close(self) -> None:
        self.outbox.put(None)
        self.thread.join(10)


def run_engine_core(config: EngineConfig, clients: list[tuple[Connection, Connection]]) -> None:
    """The child process: build the engine, then apply every client's commands and step until the
    last client has stopped or gone. `clients` holds one (commands, results) pipe pair per API
    process; each gets the outputs of its own requests."""
    # Ctrl-C and `timeout`/`kill` reach the whole process group: the API processes drain their
    # requests and then stop this process; it also exits when their ends of the pipes close.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        for _, results in clients:
            results.send(("error", type(exc).__name__, getattr(exc, "message", str(exc))))
        return
    engine.structured.prepare()  # before serving: see StructuredOutputs.prepare
    info = EngineInfo(engine.tokenizer, engine.model_config, engine.max_model_len, engine.live_stats())
    for _, results in clients:
        results.send(("ready", info))
    try:
        _EngineCore(engine, clients).run()
    finally:
        engine.shutdown()


class _EngineCore:
    """The engine process's loop over several clients: who owns which request, whose commands
    have arrived, and which outputs go back to whom."""

    def __init__(self, engine: LLMEngine, clients: list[tuple[Connection, Connection]]) -> None:
        self.engine = engine
        self.commands: dict[Connection, int] = {commands: i for i, (commands, _) in enumerate(clients)}
        self.reporters: dict[int, _Reporter] = {i: _Reporter(results) for i, (_, results) in enumerate(clients)}
        self.owner: dict[str, int] = {}  # request id -> client index, for unfinished requests
        # The last per-client load and the queue sizes it was counted at: recounted only when
        # requests came, went or moved (not on every report of a steady multi-step run).
        self._load: dict[int, tuple[int, int]] = {}
        self._load_at: tuple[int, int] | None = None

    def run(self) -> None:
        while self.commands:
            busy = self.engine.has_unfinished()
            # Idle: block for the next commands. Busy: take every command that has arrived.
            ready = wait(list(self.commands), timeout=0 if busy else None)
            if busy and not ready:
                self._step_and_report([])
                continue
            failed: list[RequestOutput] = []
            for conn in ready:
                client = self.commands[conn]
                try:
                    batch = conn.recv()
                    while conn.poll():
                        batch += conn.recv()
                except (EOFError, OSError):  # the API process went away: drop its requests
                    self._drop(client, reply=False)
                    continue
                self._load_at = None
                for kind, payload in batch:
                    if kind == "add":
                        self.owner[payload.request_id] = client
                        try:
                            self.engine.add_sequence(payload)
                        except EngineError as exc:
                            failed.append(RequestOutput(payload.request_id, [], "", True, finish_reason="abort",
                                                        stop_reason=exc.message))
                    elif kind == "abort":
                        self.engine.abort_request(payload)
                        self.owner.pop(payload, None)
                    elif kind == "stop":
                        self._drop(client, reply=True)
                        break
            if self.commands:
                self._step_and_report(failed)

    def _drop(self, client: int, reply: bool) -> None:
        """Forget a client: abort its unfinished requests; answer its stop if it asked."""
        for request_id in [r for r, c in self.owner.items() if c == client]:
            self.engine.abort_request(request_id)
            del self.owner[request_id]
        self.commands = {conn: c for conn, c in self.commands.items() if c != client}
        self._load_at = None
        reporter = self.reporters.pop(client)
        if reply:
            reporter.send(("stopped",))
        reporter.close()

    def _step_and_report(self, outputs: list[RequestOutput]) -> None:
        """One step (if there is work), reported to every client. A failing step fails its
        requests, not the process, as in one process (AsyncEngine._fail_all)."""
        engine = self.engine
        if engine.has_unfinished():
            try:
                outputs = outputs + engine.step()
            except Exception as exc:  # noqa: BLE001 - reported; the clients fail their requests
                logger.exception("engine step failed; aborting %d requests", engine.num_unfinished)
                for request_id in list(engine.requests):
                    engine.abort_request(request_id)
                self.owner.clear()
                for reporter in self.reporters.values():
                    reporter.send(("step_failed", f"{type(exc).__name__}: {exc}", engine.live_stats()))
                return
        stats = engine.live_stats()
        if len(self.reporters) == 1:  # the common case: everything is this client's
            reporter, = self.reporters.values()
            for out in outputs:
                if out.finished:
                    self.owner.pop(out.request_id, None)
            reporter.send(("step", _pack(outputs), stats, (stats.num_running, 0)))
            return
        by_client: dict[int, list[RequestOutput]] = {c: [] for c in self.reporters}
        for out in outputs:
            if out.finished:
                client = self.owner.pop(out.request_id, None)
                self._load_at = None
            else:
                client = self.owner.get(out.request_id)
            if client in by_client:
                by_client[client].append(out)
        if self._load_at != (stats.num_running, stats.num_waiting):
            self._load = self._load_by_client()
            self._load_at = (stats.num_running, stats.num_waiting)
        for client, reporter in self.reporters.items():
            reporter.send(("step", _pack(by_client[client]), stats, self._load.get(client, (0, 0))))

    def _load_by_client(self) -> dict[int, tuple[int, int]]:
        """Per client: (its requests running, the requests waiting that are not its own). An API
        process counts its own waiting requests itself, as they arrive (they reach this process
        late); with these two it knows the engine's whole queue for --max-waiting."""
        running = dict.fromkeys(self.reporters, 0)
        waiting = dict.fromkeys(self.reporters, 0)
        for request_id, request in self.engine.requests.items():
            client = self.owner.get(request_id)
            if client in running:
                if request.seq.status is SequenceStatus.RUNNING:
                    running[client] += 1
                else:
                    waiting[client] += 1
        total_waiting = sum(waiting.values())
        return {c: (running[c], total_waiting - waiting[c]) for c in self.reporters}


@dataclass
class EngineCoreHandle:
    """A started engine process: its process and, per API process, the pipe ends that API process
    uses (commands, results) and what the engine reported when it became ready."""

    process: mp.process.BaseProcess
    pipes: list[tuple[Connection, Connection]]
    info: EngineInfo | None  # None until wait_ready()

    def wait_ready(self) -> None:
        """Wait for the engine's start-up report on every pipe; EngineError if it failed."""
        for _, results in self.pipes:
            try:
                msg = results.recv()
            except EOFError:
                self.process.join(5)
                raise EngineError(f"the engine process exited during start-up (exit code {self.process.exitcode})") from None
            if msg[0] == "error":
                self.process.join(5)
                raise EngineError(f"{msg[1]}: {msg[2]}")
            self.info = msg[1]

    def stop(self, timeout_s: float = 15.0) -> None:
        """For the process that started the engine, once its API processes have stopped or gone:
        close this process's copies of their pipes (the engine exits when no client end is left
        open), then reap it."""
        for commands, results in self.pipes:
            commands.close()
            results.close()
        reap(self.process, timeout_s)


def reap(process: mp.process.BaseProcess, timeout_s: float) -> None:
    """Wait up to `timeout_s` for `process` to exit, then kill it."""
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        process.join(5)


def start_engine_core(config: EngineConfig, num_clients: int = 1, visible_devices: str | None = None,
                      wait: bool = True) -> EngineCoreHandle:
    """Spawn the engine process with one pipe pair per API process and wait until it has loaded
    the model; a start-up failure raises EngineError here. `visible_devices`: the GPUs it may see
    (CUDA_VISIBLE_DEVICES, a data-parallel core's share). `wait=False`: return at once; call
    `handle.wait_ready()` (several cores then load at the same time)."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: CUDA must not be inherited through fork
    pipes, child_pipes = [], []
    for _ in range(num_clients):
        child_commands, commands = ctx.Pipe(duplex=False)
        results, child_results = ctx.Pipe(duplex=False)
        pipes.append((commands, results))
        child_pipes.append((child_commands, child_results))
    # Daemonic unless it may start tensor-parallel or grammar workers of its own (a daemon may not
    # have children; None grammar workers: decided by the device it finds).
    process = ctx.Process(target=run_engine_core, args=(config, child_pipes), name="roseinfer-engine-core",
                          daemon=config.tensor_parallel_size == 1 and config.grammar_workers == 0)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible_devices is not None:  # the child reads it when it first touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    try:
        process.start()
    finally:
        if visible_devices is not None:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
    for child_commands, child_results in child_pipes:
        child_commands.close()
        child_results.close()
    handle = EngineCoreHandle(process, pipes, None)  # type: ignore[arg-type]
    if wait:
        handle.wait_ready()
    return handle


class EngineCoreClient:
    """Stands in for LLMEngine inside AsyncEngine; the engine itself runs in another process.

    `step()` blocks until the engine process reports (AsyncEngine runs it in its worker thread),
    while `add_sequence` and `abort_request` return at once: a sender thread writes them to the
    pipe and the engine process applies them between its steps. The event loop never writes to
    the pipe itself: with hundreds of requests arriving at once the pipe fills, and a loop blocked
    on it could not restart the step that reads the engine's results, while the engine, blocked
    on sending those results, would never read its commands.

    `EngineCoreClient(config)` starts an engine process of its own. With `--api-server-count` the
    engine process is shared: each API process attaches to its own pipe pair (`pipes`, `info`)
    and the process that started the engine reaps it (`process` stays None here).
    """

    accepts_commands_while_stepping = True

    def __init__(self, config: EngineConfig, pipes: tuple[Connection, Connection] | None = None,
                 info: EngineInfo | None = None) -> None:
        self.config = config
        self.process: mp.process.BaseProcess | None = None
        if pipes is None:
            handle = start_engine_core(config)
            self.process, pipes, info = handle.process, handle.pipes[0], handle.info
        assert info is not None
        self._commands, self._results = pipes
        self.tokenizer = info.tokenizer
        self.model_config = info.model_config
        self.max_model_len = info.max_model_len
        self.last_step = info.stats
        self.requests: dict[str, None] = {}  # unfinished request ids, in arrival order
        # From the engine's latest report: how many of our requests run, how many of the other
        # API processes' wait.
        self._running_here = 0
        self._waiting_elsewhere = 0
        self._open = True
        self._stop_deadline: float | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_commands, name="roseinfer-engine-commands", daemon=True)
        self._sender.start()

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    @property
    def num_waiting(self) -> int:
        # Our own counted here, not from the engine's last report, which lags a burst of arrivals:
        # requests not known to be running. Over-counts those admitted since the report (errs
        # toward 429). Other API processes' waiting requests as of that report.
        return max(0, len(self.requests) - self._running_here) + self._waiting_elsewhere

    def make_sequence(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Sequence:
        return build_sequence(self.tokenizer, self.model_config.vocab_size, self.max_model_len, request_id, prompt, params)

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise InvalidRequest(f"duplicate request id {seq.request_id!r}")
        self._send(("add", seq))
        self.requests[seq.request_id] = None

    def abort_request(self, request_id: str) -> bool:
        if request_id not in self.requests:
            return False
        del self.requests[request_id]
        self._send(("abort", request_id))
        return True

    def has_unfinished(self) -> bool:
        # While the engine runs, the worker thread always waits on its results, so gauge updates
        # after aborts arrive even with no request left.
        return self._open

    def step(self) -> list[RequestOutput]:
        """The outputs of every step the engine has reported since the last call (at least one)."""
        outputs: list[RequestOutput] = []
        while True:
            try:
                msg = self._receive()
            except (EOFError, OSError):
                self._open = False
                raise EngineDead(self._dead_message()) from None
            if msg[0] == "stopped":
                self._open = False
                break
            if msg[0] == "step_failed":
                self.last_step = msg[2]
                raise RuntimeError(msg[1])  # outputs of earlier steps in `outputs` are lost with the batch
            outputs.extend(_unpack(msg[1]))
            self.last_step = msg[2]
            self._running_here, self._waiting_elsewhere = msg[3]
            if not self._results.poll():
                break
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outputs

    def live_stats(self) -> StepStats:
        return self.last_step

    def _receive(self) -> tuple:
        # Wait in slices: after shutdown() of a client that does not own the engine process,
        # give up on the "stopped" reply at the deadline instead of waiting forever.
        while not self._results.poll(0.5):
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                raise EOFError
        return self._results.recv()

    def _dead_message(self) -> str:
        code = "" if self.process is None else f" (exit code {self.process.exitcode})"
        return f"the engine process died{code}"

    def _send(self, command: tuple) -> None:
        if not self._open:
            raise EngineDead(self._dead_message())
        self._outbox.put(command)

    def _send_commands(self) -> None:
        while True:
            batch = [self._outbox.get()]
            while not self._outbox.empty():  # a burst of arrivals goes in one write
                batch.append(self._outbox.get())
            closing = batch[-1] is None
            batch = [c for c in batch if c is not None]
            try:
                if batch:
                    self._commands.send(batch)
            except (BrokenPipeError, OSError):  # the engine is gone; `step` reports it
                return
            if closing:
                return

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the engine to stop serving us (the worker thread's `step` then returns); reap its
        process if we started it. A shared engine process exits after its last client stops."""
        self._outbox.put(("stop", None))
        self._outbox.put(None)
        if self.process is None:
            self._stop_deadline = time.monotonic() + timeout_s
            return
        reap(self.process, timeout_s)
        self._open = False
