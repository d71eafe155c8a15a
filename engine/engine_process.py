"""The engine core in its own process, behind the interface AsyncEngine drives (vLLM v1's split).

In one process the HTTP handlers (request parsing, SSE JSON, socket writes) and the engine's
host work share one GIL; at a few hundred concurrent streams the event loop alone keeps a core
busy and the engine thread waits for the GIL while the GPU idles. Here the child process owns
the model, the scheduler and the KV cache and steps as fast as the device allows; the API
process keeps tokenization, validation and the streams.

Protocol: two one-way pipes, each written by its own sender thread so that neither the event
loop nor the engine's step loop ever blocks on a full pipe. Commands to the child, in lists of
whatever queued up: ("add", Sequence), ("abort", request_id), ("stop", None). Results from it:
("ready", EngineInfo) or ("error", kind, message) once at start-up; then ("step", outputs as
tuples, StepStats) after every step, and after every batch of commands applied while idle (so
aborts show up in the gauges at once); ("stopped",) last.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import queue
import signal
import threading
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from operator import attrgetter

from engine.config import EngineConfig, ModelConfig
from engine.errors import EngineDead, EngineError, InvalidRequest
from engine.llm_engine import LLMEngine, RequestOutput, StepStats, build_sequence
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

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


def run_engine_core(config: EngineConfig, commands: Connection, results: Connection) -> None:
    """The child process: build the engine, then apply commands and step until told to stop."""
    # Ctrl-C and `timeout`/`kill` reach the whole process group: the parent drains its requests
    # and then stops this process; it also exits when the parent's end of the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        results.send(("error", type(exc).__name__, getattr(exc, "message", str(exc))))
        return
    results.send(("ready", EngineInfo(engine.tokenizer, engine.model_config, engine.max_model_len, engine.live_stats())))
    reporter = _Reporter(results)
    try:
        while True:
            busy = engine.has_unfinished()
            if busy and not commands.poll():
                _step_and_report(engine, reporter, [])
                continue
            # Idle: block for the next commands. Busy: take every command that has arrived.
            batch = commands.recv()
            while commands.poll():
                batch += commands.recv()
            failed: list[RequestOutput] = []
            for kind, payload in batch:
                if kind == "add":
                    try:
                        engine.add_sequence(payload)
                    except EngineError as exc:
                        failed.append(RequestOutput(payload.request_id, [], "", True, finish_reason="abort",
                                                    stop_reason=exc.message))
                elif kind == "abort":
                    engine.abort_request(payload)
                elif kind == "stop":
                    reporter.send(("stopped",))
                    reporter.close()
                    return
            _step_and_report(engine, reporter, failed)
    except (EOFError, BrokenPipeError):  # the API process went away
        return


def _step_and_report(engine: LLMEngine, reporter: _Reporter, outputs: list[RequestOutput]) -> None:
    """One step (if there is work), reported. A failing step fails its requests, not the process,
    as in one process (AsyncEngine._fail_all)."""
    if engine.has_unfinished():
        try:
            outputs = outputs + engine.step()
        except Exception as exc:  # noqa: BLE001 - reported; the parent fails the requests
            logger.exception("engine step failed; aborting %d requests", engine.num_unfinished)
            for request_id in list(engine.requests):
                engine.abort_request(request_id)
            reporter.send(("step_failed", f"{type(exc).__name__}: {exc}", engine.live_stats()))
            return
    reporter.send(("step", _pack(outputs), engine.live_stats()))


class EngineCoreClient:
    """Stands in for LLMEngine inside AsyncEngine; the engine itself runs in a child process.

    `step()` blocks until the child reports (AsyncEngine runs it in its worker thread), while
    `add_sequence` and `abort_request` return at once: a sender thread writes them to the pipe and
    the child applies them between its steps. The event loop never writes to the pipe itself: with
    hundreds of requests arriving at once the pipe fills, and a loop blocked on it could not
    restart the step that reads the child's results, while the child, blocked on sending those
    results, would never read its commands.
    """

    accepts_commands_while_stepping = True

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        ctx = mp.get_context("spawn")  # a fresh interpreter: CUDA must not be inherited through fork
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._results, child_results = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=run_engine_core, args=(config, child_commands, child_results),
                                   name="roseinfer-engine-core", daemon=True)
        self.process.start()
        child_commands.close()
        child_results.close()
        try:
            msg = self._results.recv()
        except EOFError:
            self.process.join(5)
            raise EngineError(f"the engine process exited during start-up (exit code {self.process.exitcode})") from None
        if msg[0] == "error":
            self.process.join(5)
            raise EngineError(f"{msg[1]}: {msg[2]}")
        info: EngineInfo = msg[1]
        self.tokenizer = info.tokenizer
        self.model_config = info.model_config
        self.max_model_len = info.max_model_len
        self.last_step = info.stats
        self.requests: dict[str, None] = {}  # unfinished request ids, in arrival order
        self._open = True
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
        # Counted here, not from the child's last report, which lags a burst of arrivals: requests
        # not known to be running. Over-counts those admitted since the report (errs toward 429).
        return max(0, len(self.requests) - self.last_step.num_running)

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
        # While the child runs, the worker thread always waits on its results, so gauge updates
        # after aborts arrive even with no request left.
        return self._open

    def step(self) -> list[RequestOutput]:
        """The outputs of every step the child has reported since the last call (at least one)."""
        outputs: list[RequestOutput] = []
        while True:
            try:
                msg = self._results.recv()
            except (EOFError, OSError):
                self._open = False
                raise EngineDead(f"the engine process died (exit code {self.process.exitcode})") from None
            if msg[0] == "stopped":
                self._open = False
                break
            if msg[0] == "step_failed":
                self.last_step = msg[2]
                raise RuntimeError(msg[1])  # outputs of earlier steps in `outputs` are lost with the batch
            outputs.extend(_unpack(msg[1]))
            self.last_step = msg[2]
            if not self._results.poll():
                break
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outputs

    def live_stats(self) -> StepStats:
        return self.last_step

    def _send(self, command: tuple) -> None:
        if not self._open:
            raise EngineDead(f"the engine process died (exit code {self.process.exitcode})")
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
            except (BrokenPipeError, OSError):  # the child is gone; `step` reports it
                return
            if closing:
                return

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the child to stop (the worker thread's `step` then returns), then reap it."""
        self._outbox.put(("stop", None))
        self._outbox.put(None)
        if self.process.is_alive():
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._open = False
