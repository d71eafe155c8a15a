"""Where a constrained decode step's host time goes on the GPU: the seed workload (GPT-2, 64 x 512
from a one-token prompt, greedy unless --temperature) held to the `records` schema of
scripts/grammar_cost.py, with a wall-clock timer around each part of the engine's grammar loop (engine.model_runner.GrammarRun):
waiting for a step's tokens, the matchers' accept, the bitmask fill, launching the masked sample
(or its captured graph), launching the next forward, and processing a run's outputs. Against a free run's step time, it says
which part keeps the step above the forward's time.

    python scripts/grammar_step_parts.py --json out.json

`--online` sends the requests through the asyncio engine, as `roseinfer bench --mode online` does.
`--trace OUT.json.gz` also records the device's side with torch.profiler (the last 64 steps of a
free and of a records generate): how much of each step the device is busy, its idle gaps, and the
kernels' shares, so a step above the free one says whether the device waits for the host or has
more to do itself.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

import engine.model_runner as model_runner
from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.bench import run_online
from engine.llm_engine import LLMEngine
from engine.sampling_params import StructuredOutputSpec
from engine.structured_output import GrammarSteps
from grammar_cost import RECORD  # scripts/, this script's directory

SCHEMA = {"type": "array", "minItems": 100, "items": RECORD}

totals: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
            calls[name] += 1
    return wrapper


def instrument() -> None:
    GrammarSteps.fill = timed("fill", GrammarSteps.fill)
    GrammarSteps.accept = timed("accept", GrammarSteps.accept)
    model_runner.sample = timed("sample launch", model_runner.sample)
    decoder = model_runner.CudaGraphDecoder
    decoder.run_decode = timed("forward launch", decoder.run_decode)
    if hasattr(decoder, "masked_step"):  # graph steps: the masked argmax or sample, then the forward
        decoder.masked_step = timed("sample launch", decoder.masked_step)
        decoder.replay_decode = timed("forward launch", decoder.replay_decode)
    torch.cuda.Event.synchronize = timed("wait for tokens", torch.cuda.Event.synchronize)
    LLMEngine._accept_decode_run = timed("process outputs", LLMEngine._accept_decode_run)
    model_runner.GrammarRun.finish = timed("run (all of it)", model_runner.GrammarRun.finish)


ONLINE: AsyncEngine | None = None  # --online: requests go through the asyncio engine, as `bench --mode online`


def run(llm: LLM, params: SamplingParams, requests: int) -> float:
    prompts = [[15496]] * requests  # "Hello", as the seed bench
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    if ONLINE is not None:
        run_online(ONLINE, prompts, params)
    else:
        llm.generate(prompts, params)
    sync()
    return time.perf_counter() - start


def device_profile(llm: LLM, params: SamplingParams, requests: int, trace_path: str) -> dict:
    """Kernel and copy intervals of a generate's last 64 steps on the device (from torch.profiler's
    chrome trace): busy share, idle gaps and the largest kernels (by name, summed)."""
    import gzip

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # no CPU ops: their recording would slow the host
        run(llm, params, requests)
    prof.export_chrome_trace(trace_path)
    with (gzip.open if trace_path.endswith(".gz") else open)(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    device = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                    if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("dur", 0) > 0)
    if not device:
        return {}  # no CUDA activity (a CPU run)
    steps = params.max_tokens
    window = device[int(len(device) * (1 - 64 / steps)):] if steps > 64 else device
    busy, gaps, end = 0.0, [], None
    by_name: dict[str, float] = defaultdict(float)
    for start, stop, name in window:
        by_name[name[:70]] += stop - start
        if end is None or start >= end:
            if end is not None:
                gaps.append(start - end)
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    span = end - window[0][0]
    total = sum(by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"step_us": span / 64, "busy_share": busy / span, "idle_us_per_step": (span - busy) / 64,
            "gaps_over_5us": sum(g > 5 for g in gaps), "largest_gaps_us": sorted(gaps)[-5:],
            "top_kernels_share": {name: t / total for name, t in top}}


def main() -> None:
    global ONLINE
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--device", default="cuda")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the seed bench")
    p.add_argument("--json", default=None)
    p.add_argument("--grammar-workers", type=int, default=None, help="engine.grammar_workers (default: the engine's)")
    p.add_argument("--trace", default=None, help="also profile the device; the chrome trace goes here")
    p.add_argument("--online", action="store_true",
                   help="through the asyncio engine in this process (its event-loop thread shares the step thread's GIL)")
    args = p.parse_args()
    llm = LLM("gpt2", load_format="dummy", device=args.device, max_num_seqs=args.requests, enable_prefix_caching=False,
              grammar_workers=args.grammar_workers)
    if args.online:
        ONLINE = AsyncEngine(engine=llm.engine)
    free = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=args.temperature)
    records = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=args.temperature,
                             structured_output=StructuredOutputSpec.json_schema(json.dumps(SCHEMA)))
    llm.engine.structured.validate(records.structured_output)
    run(llm, free, args.requests)
    run(llm, records, args.requests)  # warm-up, both
    free_s = run(llm, free, args.requests)
    instrument()
    records_s = run(llm, records, args.requests)
    steps = args.max_tokens
    result = {"free_step_us": free_s / steps * 1e6, "records_step_us": records_s / steps * 1e6,
              "parts_us_per_step": {k: v / steps * 1e6 for k, v in totals.items()}, "calls": dict(calls)}
    print(f"free step {result['free_step_us']:.0f} us, records step {result['records_step_us']:.0f} us "
          f"(whole generate over {steps} steps)")
    for name, us in sorted(result["parts_us_per_step"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:18} {us:8.1f} us a step  ({calls[name]} calls)")
    if args.trace:
        for name, params in (("free", free), ("records", records)):
            base, _, ext = args.trace.partition(".")
            prof = device_profile(llm, params, args.requests, f"{base}_{name}.{ext}")
            result[f"device_{name}"] = prof
            if not prof:
                continue
            print(f"device, {name}: step {prof['step_us']:.0f} us over the last 64 steps, busy {prof['busy_share']:.1%}, "
                  f"idle {prof['idle_us_per_step']:.0f} us a step, {prof['gaps_over_5us']} gaps over 5 us")
            for kernel, share in prof["top_kernels_share"].items():
                print(f"    {share:6.1%}  {kernel}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
