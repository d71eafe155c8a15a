"""The HTTP layer's overhead: load-test runs at rate inf against `roseinfer bench --mode online` runs
of the same workload, as medians over repeated runs (single bursts of ~1.5 s move by +-10%).

    python scripts/http_overhead.py --http DIR [DIR ...] --inprocess bench.json [--json out.json]

Each --http DIR is a load-test --out directory (every run in its results.json counts); the bench
JSON is `roseinfer bench --output-json`. Besides throughput it prints each run's timeline on the
shared clock (seconds from the burst's start), which shows where an HTTP run loses time against
an in-process one: getting the requests in (the first wave's first tokens), or streaming them out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _nth(values: list[float], n: int) -> float:
    v = sorted(values)
    return v[min(n, len(v)) - 1]


def timeline(first_token_s: list[float], end_s: list[float], max_num_seqs: int) -> dict:
    """When the first wave (the first `max_num_seqs` requests to start) had all begun, when the
    last request began, when the first wave's slots all turned over, and the end."""
    return {"wave1_first_tokens_s": _nth(first_token_s, max_num_seqs), "last_first_token_s": max(first_token_s),
            "wave1_ends_s": _nth(end_s, max_num_seqs), "last_end_s": max(end_s)}


def http_runs(directory: str, max_num_seqs: int) -> list[dict]:
    report = json.loads((Path(directory) / "results.json").read_text())
    runs = []
    for run in report["runs"]:
        ok = [r for r in run["requests"] if r["status"] == 200 and r["error"] is None]
        s = run["summary"]
        runs.append({"source": f"{directory} rate {run['request_rate']}", "tokens_per_s": s["output_token_throughput"],
                     "duration_s": s["duration_s"], "failed": s["failed"],
                     **timeline([r["first_token_s"] for r in ok], [r["end_s"] for r in ok], max_num_seqs)})
    return runs


def inprocess_runs(path: str, max_num_seqs: int) -> list[dict]:
    report = json.loads(Path(path).read_text())
    return [{"source": f"{path} run {i}", "tokens_per_s": r["throughput_total"], "duration_s": r["total_s"], "failed": 0,
             **timeline(r["ttft_s"], r["latency_s"], max_num_seqs)} for i, r in enumerate(report["runs"])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--http", nargs="+", required=True, help="load-test --out directories")
    p.add_argument("--inprocess", required=True, help="roseinfer bench --output-json file")
    p.add_argument("--max-num-seqs", type=int, default=256, help="the server's batch limit: the size of a wave")
    p.add_argument("--json", default=None, help="also write the table and medians here")
    args = p.parse_args(argv)

    http = [r for d in args.http for r in http_runs(d, args.max_num_seqs)]
    local = inprocess_runs(args.inprocess, args.max_num_seqs)
    cols = ("tokens_per_s", "wave1_first_tokens_s", "last_first_token_s", "wave1_ends_s", "last_end_s")
    print(f"{'run':<46}" + "".join(f"{c:>22}" for c in cols))
    for label, rows in (("HTTP", http), ("in-process", local)):
        for r in rows:
            print(f"{label + ' ' + r['source'][-38:]:<46}" + "".join(f"{r[c]:>22.3f}" for c in cols))
    medians = {label: {c: statistics.median(r[c] for r in rows) for c in cols} for label, rows in (("http", http), ("inprocess", local))}
    ratio = medians["http"]["tokens_per_s"] / medians["inprocess"]["tokens_per_s"]
    for label in ("http", "inprocess"):
        print(f"{'median ' + label:<46}" + "".join(f"{medians[label][c]:>22.3f}" for c in cols))
    print(f"HTTP / in-process (medians of {len(http)} and {len(local)} runs): {ratio:.1%}"
          + (f"; {sum(r['failed'] for r in http)} failed requests" if any(r["failed"] for r in http) else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"http": http, "inprocess": local, "medians": medians, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
