"""What the asyncio layer (engine.AsyncEngine over an in-process engine) adds to each engine step:
a stand-in engine whose step waits `--device-ms` with the GIL released (as a step waits on the
GPU) and returns one 8-token output per request, driven by `--rows` streaming consumers as
`roseinfer bench --mode online` drives the real one. Prints the wall time a step and the event-loop
thread's CPU time a step; the wall time over the device time is the layer's cost.

    python scripts/async_step_overhead.py --rows 64 --device-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import time
from types import SimpleNamespace

from engine.async_engine import AsyncEngine
from engine.llm_engine import RequestOutput
from engine.sampling_params import SamplingParams


class StandInEngine:
    """The parts of LLMEngine that AsyncEngine drives; each request ends after `steps` steps."""

    accepts_commands_while_stepping = False
    last_step = None
    num_waiting = 0

    def __init__(self, steps: int, device_s: float) -> None:
        self.steps, self.device_s = steps, device_s
        self.requests: dict[str, int] = {}

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def make_sequence(self, request_id: str, prompt, params) -> SimpleNamespace:
        return SimpleNamespace(request_id=request_id)

    def add_sequence(self, seq) -> None:
        self.requests[seq.request_id] = 0

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.device_s)  # the GIL is free meanwhile, as while the device runs
        outputs = []
        for request_id in list(self.requests):
            self.requests[request_id] += 1
            done = self.requests[request_id] >= self.steps
            outputs.append(RequestOutput(request_id, list(range(8)), "abcdefgh", done,
                                         finish_reason="length" if done else None))
            if done:
                del self.requests[request_id]
        return outputs


def measure(rows: int, steps: int, device_s: float) -> tuple[float, float]:
    engine = AsyncEngine(engine=StandInEngine(steps, device_s))

    async def consume(i: int) -> int:
        return sum([len(o.new_token_ids) async for o in engine.generate(f"r{i}", [1], SamplingParams(max_tokens=8))])

    async def main() -> tuple[float, float]:
        cpu, wall = time.thread_time(), time.perf_counter()
        await asyncio.gather(*(consume(i) for i in range(rows)))
        return time.perf_counter() - wall, time.thread_time() - cpu

    wall, loop_cpu = asyncio.run(main())
    asyncio.run(engine.shutdown())
    return wall / steps, loop_cpu / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--device-ms", type=float, default=5.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    for _ in range(args.repeat):
        wall, loop_cpu = measure(args.rows, args.steps, args.device_ms / 1e3)
        print(f"{args.rows} streams, device {args.device_ms:.2f} ms a step: wall {wall * 1e3:.2f} ms a step "
              f"(+{(wall * 1e3 - args.device_ms):.2f}), event-loop thread CPU {loop_cpu * 1e6:.0f} us a step", flush=True)


if __name__ == "__main__":
    main()
