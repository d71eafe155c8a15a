"""The asyncio engine: requests stream their outputs while one loop steps the engine.

Steps run in a worker thread so the event loop (and HTTP) stays responsive,
back to back while nobody joins or leaves, each step's outputs passed to the
loop as they come. Engine state is only mutated on the event-loop thread
while no step is running: requests and aborts that arrive during a step end
the streak and are applied right after that step, i.e. within one step. The
next step starts before a step's outputs are handed out, so the two overlap.

`engine` is an LLMEngine in this process, or an EngineCoreClient
(engine/engine_process.py) whose engine runs in a child process: its `step`
waits for the child's next report, and it takes requests and aborts at any
time (`accepts_commands_while_stepping`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.errors import EngineDead, EngineOverloaded, InvalidRequest
from engine.llm_engine import LLMEngine, RequestOutput, StepStats, merge_outputs
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

if TYPE_CHECKING:
    from engine.engine_process import EngineCoreClient

logger = logging.getLogger(__name__)


class RequestStream:
    """The outputs of one request. `close()` before the end aborts it (frees its blocks).

    Deltas that queued up while the consumer was busy come out merged into one, so a consumer
    that falls behind (an HTTP server streaming to hundreds of clients) pays its per-delta cost
    once per wake-up instead of once per engine step.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self._held: BaseException | None = None  # an error queued behind deltas being merged
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = await self._queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            later = self._queue.get_nowait()
            if isinstance(later, BaseException):
                self._held = later
                break
            item = merge_outputs(item, later)
        if isinstance(item, BaseException):
            self.finished = True
            self.engine._queues.pop(self.request_id, None)
            raise item
        if item.finished:
            self.finished = True
            self.engine._queues.pop(self.request_id, None)
        return item

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine._queues.pop(self.request_id, None)
            self.engine._abort_now_or_after_step(self.request_id)


# The GIL switch interval while an in-process engine steps on a thread. Each time the step thread
# waits (for the device, or on a grammar's bitmask fill) it drops the GIL, and to go on it must
# wait for the event-loop thread, busy turning outputs into stream items, to yield it: up to the
# interval, 5 ms by default, against a ~0.6 ms step. Measured on an H200 (GPT-2 seed workload, 64
# rows held to a JSON schema, `roseinfer bench --mode online`): 5 ms ~52k tokens/s, 0.5 ms 65-84k
# (offline, no loop thread: 83k); unconstrained 111.3k vs 110.7k (docs/BENCHMARKS.md).
STEP_THREAD_SWITCH_INTERVAL_S = 5e-4


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | EngineCoreClient | None = None,
                 max_waiting: int | None = None) -> None:
        self.engine = engine if engine is not None else LLMEngine(config or EngineConfig())
        if isinstance(self.engine, LLMEngine):  # steps on a thread of this process (not an engine process)
            sys.setswitchinterval(min(sys.getswitchinterval(), STEP_THREAD_SWITCH_INTERVAL_S))
        self.max_waiting = max_waiting
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._pending_adds: list[Sequence] = []
        self._pending_aborts: set[str] = set()
        self._stepping = False
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roseinfer-step")
        self.dead: BaseException | None = None
        self.step_listeners: list = []  # callables(StepStats, list[RequestOutput])

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            if self.dead is not None:
                raise EngineDead(f"engine loop stopped: {self.dead}")
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Validate and queue a request now (errors raise here); iterate the stream for its outputs."""
        self._ensure_loop()
        if request_id in self._queues:
            raise InvalidRequest(f"duplicate request id {request_id!r}")
        if self.dead is not None:
            raise EngineDead(f"engine stopped: {self.dead}")
        if self.max_waiting is not None and self.engine.num_waiting + len(self._pending_adds) >= self.max_waiting:
            raise EngineOverloaded(f"too many waiting requests (limit {self.max_waiting}); retry later")
        seq = self.engine.make_sequence(request_id, prompt, params)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        if self._stepping and not self.engine.accepts_commands_while_stepping:
            self._pending_adds.append(seq)
        else:
            self.engine.add_sequence(seq)
        assert self._wake is not None
        self._wake.set()
        return RequestStream(self, request_id, queue)

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Stream `RequestOutput` deltas; the last has `finished=True`. Leaving early aborts the request."""
        stream = self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Stop a request: its KV blocks are freed now, or right after the step in flight."""
        self._abort_now_or_after_step(request_id)
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(RequestOutput(request_id, [], "", True, finish_reason="abort"))

    def _abort_now_or_after_step(self, request_id: str) -> None:
        known = request_id in self.engine.requests or any(s.request_id == request_id for s in self._pending_adds)
        self._pending_adds = [s for s in self._pending_adds if s.request_id != request_id]
        if self._stepping and not self.engine.accepts_commands_while_stepping:
            self._pending_aborts.add(request_id)
        else:
            self.engine.abort_request(request_id)
        if known:
            aborted = [RequestOutput(request_id, [], "", True, finish_reason="abort")]
            for listener in self.step_listeners:
                listener(self.engine.last_step, aborted)

    def _apply_pending(self) -> None:
        for request_id in self._pending_aborts:
            self.engine.abort_request(request_id)
        self._pending_aborts.clear()
        for seq in self._pending_adds:
            self.engine.add_sequence(seq)
        self._pending_adds.clear()

    def _steps(self, loop: asyncio.AbstractEventLoop) -> tuple[list[RequestOutput], StepStats]:
        """Engine steps on the step thread, back to back while there is work and no command waits:
        each step's outputs but the last go to the event loop as they come (`_deliver`, in order),
        the last as the result. Returning to the loop between steps would put two thread wake-ups
        (the loop's, then the step thread's) and the loop's turn at the GIL between every pair of
        steps, while the device idles once a run's queued work is done."""
        while True:
            outputs = self.engine.step()
            stats = self.engine.last_step
            if self._pending_adds or self._pending_aborts or self._stopping or not self.engine.has_unfinished():
                return outputs, stats
            loop.call_soon_threadsafe(self._deliver, outputs, stats)

    def _start_step(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        self._stepping = True
        return loop.run_in_executor(self._executor, self._steps, loop)

    def _deliver(self, outputs: list[RequestOutput], stats: StepStats) -> None:
        """One step's outputs to their streams and to the step listeners (the metrics)."""
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out if out.error is None else EngineDead(out.error))
        for listener in self.step_listeners:
            listener(stats, outputs)

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        step: asyncio.Future | None = None
        while True:
            if step is None:
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                step = self._start_step(loop)
            try:
                outputs, stats = await step
            except Exception as exc:  # a broken step fails its requests, not the server
                logger.exception("engine step failed; aborting %d requests", self.engine.num_unfinished)
                self._stepping = False
                if isinstance(exc, EngineDead):  # the engine process is gone: nothing will step again
                    self.dead = exc
                self._fail_all(exc)
                step = None
                continue
            self._stepping = False
            self._apply_pending()
            # The next step starts before these outputs go out: the engine thread, which mostly
            # waits on the device, then overlaps the handlers' per-output work (JSON, socket
            # writes) instead of idling the GPU behind it.
            step = self._start_step(loop) if self.engine.has_unfinished() else None
            self._deliver(outputs, stats)
            await asyncio.sleep(0)  # let handlers run between steps

    def _fail_all(self, exc: BaseException) -> None:
        self._apply_pending()
        if self.dead is None:
            for request_id in list(self.engine.requests):
                self.engine.abort_request(request_id)
        err = EngineDead(f"engine step failed: {exc}")
        for queue in self._queues.values():
            queue.put_nowait(err)

    def stats(self) -> StepStats:
        """The engine's gauges as of now (aborts since its last step included)."""
        return self.engine.live_stats()

    async def shutdown(self) -> None:
        self._stopping = True  # the step thread's streak ends after its step in flight
        stop_engine = getattr(self.engine, "shutdown", None)  # an engine process: stop it, which ends a waiting step
        if stop_engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, stop_engine)
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=True)
