"""The same chat workload against several OpenAI-compatible servers, one after another, in one run:
one stream (requests one at a time), then N at once; greedy, up to 128 new tokens each, prompts
from load_tests/data/chat_long_answers.jsonl. Output tokens are the servers' own usage counts.
With --rounds R the servers take turns R times and the medians are compared (a 2-core box
moves by 5% from run to run).

    python scripts/compare_servers.py --server roseinfer=http://127.0.0.1:8000,smollm2-135m-instruct \\
        --server llama.cpp=http://127.0.0.1:8001,smollm2 --streams 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from load_tests.harness import run_load
from load_tests.workload import file_workload

DATA = os.path.join(os.path.dirname(__file__), "..", "load_tests", "data", "chat_long_answers.jsonl")


def aggregate_tokens_per_s(base_url: str, model: str, num_prompts: int, concurrency: int, output_len: int) -> dict:
    specs = file_workload(DATA, num_prompts, output_len, "chat")
    records, duration_s = run_load(base_url, model, specs, "chat", float("inf"), 1.0, concurrency, seed=0,
                                   progress=False)
    failed = [r for r in records if not r.ok]
    tokens = sum(r.output_tokens for r in records)
    return {"requests": len(records), "failed": len(failed), "output_tokens": tokens, "duration_s": duration_s,
            "tokens_per_s": tokens / duration_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--server", action="append", required=True, help="NAME=BASE_URL,MODEL (repeatable)")
    p.add_argument("--streams", type=int, default=8, help="concurrent streams of the second run")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--single-prompts", type=int, default=4, help="requests in the one-stream run")
    p.add_argument("--rounds", type=int, default=1, help="turns each server takes (medians compared)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    servers = []
    for item in args.server:
        name, _, rest = item.partition("=")
        base_url, _, model = rest.partition(",")
        servers.append((name, base_url, model))
    many_key = f"{args.streams}_streams"
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in servers}
    for round_index in range(args.rounds):
        for name, base_url, model in servers:
            one = aggregate_tokens_per_s(base_url, model, args.single_prompts, 1, args.output_len)
            many = aggregate_tokens_per_s(base_url, model, 2 * args.streams, args.streams, args.output_len)
            runs[name].append({"one_stream": one, many_key: many})
            print(f"round {round_index + 1} {name:<12} one stream {one['tokens_per_s']:7.1f} tokens/s   {args.streams} streams "
                  f"{many['tokens_per_s']:7.1f} tokens/s  (failed: {one['failed'] + many['failed']})", flush=True)
    median = {name: {key: statistics.median(r[key]["tokens_per_s"] for r in rs) for key in ("one_stream", many_key)}
              for name, rs in runs.items()}
    report = {"runs": runs, "median_tokens_per_s": median}
    for name, m in median.items():
        print(f"median {name:<12} one stream {m['one_stream']:7.1f} tokens/s   {args.streams} streams {m[many_key]:7.1f} tokens/s")
    names = list(median)
    for name in names[:-1]:
        base = median[names[-1]]
        print(f"{name} / {names[-1]}: one stream {median[name]['one_stream'] / base['one_stream']:.2f}x, "
              f"{args.streams} streams {median[name][many_key] / base[many_key]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
