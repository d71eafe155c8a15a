"""What a constrained decode step costs the host: xgrammar's bitmask fill and token accept, per
row, over GPT-2's vocabulary, for the schemas `scripts/gpu_suite.sh structured` benchmarks. Every
row follows the same valid text (token by token), so the figures repeat from run to run. The fill
is the engine's (engine.structured_output.FillThreads), held to each --threads count.

A constrained multi-step run does this work for each step while the device runs that step's
forward (engine.structured_output.GrammarSteps): it stays hidden while rows x (fill + accept) is
shorter than a forward (GPT-2 at batch 64 on an H200: ~0.45 ms).

    python scripts/grammar_cost.py --rows 64 --threads 1,2,4
    python scripts/grammar_cost.py --rows 64 --threads 1 --workers 1,2,4   # also the matchers in worker processes

With --workers the same step runs with the matchers in engine.grammar_workers processes: the
step thread only posts each worker its rows and waits for their accepts and fills.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from engine.async_engine import STEP_THREAD_SWITCH_INTERVAL_S
from engine.sampling_params import StructuredOutputSpec
from engine.structured_output import FillThreads, GrammarSteps, StructuredOutputs
from engine.tokenizer import gpt2_tokenizer

RECORD = {"type": "object", "additionalProperties": False, "required": ["name", "age", "email"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "email": {"type": "string", "maxLength": 40}}}
# name: (schema, a valid prefix of its output, written as xgrammar's compact separators expect)
WORKLOADS = {
    "records": ({"type": "array", "minItems": 100, "items": RECORD},
                "[" + ", ".join(f'{{"name": "person {i}", "age": {20 + i}, "email": "p{i}@example.com"}}' for i in range(12))),
    "int600": ({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 600},
               "[" + ", ".join(str((i * 7919) % 1000) for i in range(120))),
}


def overlapped_steps_s(run: GrammarSteps, token_ids: list[int], rows: int) -> float:
    """Seconds of the engine's constrained steps over the workload's tokens, each of the run's
    `rows` taking the same one: GrammarSteps.fill with the step before's tokens (accepts, then the
    next bitmask)."""
    run.fill()
    start = time.perf_counter()
    for token in token_ids:
        run.fill([token] * rows)
    took = time.perf_counter() - start
    assert not run.ends
    return took


def measure(outputs: StructuredOutputs, tokenizer, schema: dict, text: str, rows: int, threads: int, steps: int) -> dict:
    """Per step over the workload's text: the fill and the accept apart (fill on `threads`), and
    the engine's step as a constrained run does it (GrammarSteps.fill with the step before's
    tokens: each slice's accepts, then its fill handed off, so accepts overlap fills)."""
    import xgrammar as xgr

    compiled = outputs.compile_async(StructuredOutputSpec.json_schema(schema)).result()
    token_ids = tokenizer.encode(text, add_special_tokens=False)[:steps]
    bitmask = torch.empty(rows, (outputs.vocab_size + 31) // 32, dtype=torch.int32)
    split = FillThreads(threads)  # the engine's fill, held to `threads`
    split.choices = [threads]
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    apart = GrammarSteps(outputs, matchers)
    fill = accept = 0.0
    for token in token_ids:
        start = time.perf_counter()
        split.fill_split(threads, matchers, bitmask)
        mid = time.perf_counter()
        apart.accept([token] * rows)  # the engine's accept (GrammarSteps: rows leave on a rejection)
        accept += time.perf_counter() - mid
        fill += mid - start
        assert not apart.ends, f"token {token} ({tokenizer.decode([token])!r}) rejected: fix the workload's text"
    outputs._fill = split  # the overlapped step, on the same number of threads
    together = GrammarSteps(outputs, [xgr.GrammarMatcher(compiled) for _ in range(rows)])
    overlapped = overlapped_steps_s(together, token_ids, rows)
    n = len(token_ids) * rows
    return {"fill_us_per_row": fill / n * 1e6, "accept_us_per_row": accept / n * 1e6,
            "step_us": (fill + accept) / len(token_ids) * 1e6, "overlapped_step_us": overlapped / len(token_ids) * 1e6,
            "steps": len(token_ids)}


def measure_workers(tokenizer, schema: dict, text: str, rows: int, workers: int, steps: int) -> dict:
    """The overlapped step (GrammarSteps.fill with the step before's tokens) with the matchers in
    `workers` grammar worker processes."""
    from engine.grammar_workers import GrammarWorkers

    outputs = StructuredOutputs.for_tokenizer(tokenizer, 50257, (50256,))
    GrammarWorkers.start(outputs, workers, rows)
    try:
        spec = StructuredOutputSpec.json_schema(schema)
        compiled = outputs.compile_async(spec).result()
        token_ids = tokenizer.encode(text, add_special_tokens=False)[:steps]
        run = GrammarSteps(outputs, [outputs.matcher(compiled, spec) for _ in range(rows)])
        took = overlapped_steps_s(run, token_ids, rows)
    finally:
        outputs.close()
    return {"overlapped_step_us": took / len(token_ids) * 1e6, "steps": len(token_ids)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--workers", default="", help="also with the matchers in this many grammar worker processes, e.g. 1,2,4")
    p.add_argument("--json", default=None)
    p.add_argument("--switch-interval", type=float, default=STEP_THREAD_SWITCH_INTERVAL_S,
                   help="the GIL switch interval (s): the in-process engine's by default; a fill thread "
                   "may wait this long for the GIL the stepping thread holds")
    args = p.parse_args()
    sys.setswitchinterval(args.switch_interval)
    tokenizer = gpt2_tokenizer()
    outputs = StructuredOutputs.for_tokenizer(tokenizer, 50257, (50256,))
    results = {}
    print(f"{'workload':10} {'threads':>7} {'fill us/row':>12} {'accept us/row':>14} {'step us':>9} {'overlapped':>10}")
    for name, (schema, text) in WORKLOADS.items():
        for threads in (int(t) for t in args.threads.split(",")):
            r = measure(outputs, tokenizer, schema, text, args.rows, threads, args.steps)
            results[f"{name}/{threads}"] = r
            print(f"{name:10} {threads:>7} {r['fill_us_per_row']:>12.1f} {r['accept_us_per_row']:>14.2f} {r['step_us']:>9.0f} {r['overlapped_step_us']:>10.0f}")
        for workers in (int(w) for w in args.workers.split(",") if w):
            r = measure_workers(tokenizer, schema, text, args.rows, workers, args.steps)
            results[f"{name}/workers{workers}"] = r
            print(f"{name:10} {f'{workers} proc':>7} {'':>12} {'':>14} {'':>9} {r['overlapped_step_us']:>10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
