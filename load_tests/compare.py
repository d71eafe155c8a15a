"""Compare load-test runs: `python -m load_tests.compare DIR1 DIR2 ... [--out DIR]` overlays the
latency CDFs of each directory's last run and, where they swept rates, their sweeps, and writes
compare.html (self-contained) with the summary tables side by side. Each DIR is a `--out` of
`python -m load_tests` (its results.json): ours against a peer, before against after."""

from __future__ import annotations

import argparse
import json
import os
import sys

from load_tests.plots import (_pyplot, _save, embed_png, ok_requests, plot_latency_cdfs, summary_table, timing_table,
                              workload_label, write_sweep_plot)


def load(directory: str) -> dict:
    with open(os.path.join(directory, "results.json"), encoding="utf-8") as f:
        return json.load(f)


def write_comparison(reports: dict[str, dict], out_dir: str) -> str:
    """compare.html (plus its PNGs) in out_dir; returns the HTML's path."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    pngs = []
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for label, report in reports.items():
        plot_latency_cdfs(axes, ok_requests(report["runs"][-1]), label)
    first = next(iter(reports.values()))
    fig.suptitle(f"last run of each: {workload_label(first.get('config', {}))}", fontsize=9)
    fig.tight_layout()
    pngs.append(_save(fig, out_dir, "compare_cdf.png"))
    plt.close(fig)
    swept = {label: r for label, r in reports.items() if len(r["runs"]) > 1}
    if swept:
        pngs.append(write_sweep_plot(plt, swept, out_dir, "compare_sweep.png"))
    rows = [(f"{label} rate {run['request_rate']}", run["summary"]) for label, r in reports.items() for run in r["runs"]]
    body = ["<!doctype html><html><head><meta charset='utf-8'><title>load test comparison</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
            "</head><body><h1>Load test comparison</h1><ul>"]
    body += [f"<li>{label}: {r.get('config', {}).get('base_url', '?')} ({r.get('config', {}).get('model', '?')})</li>"
             for label, r in reports.items()]
    body += ["</ul><h2>Summary (latencies in ms)</h2>", summary_table(rows),
             "<h2>Where the time went (server's clock, ms)</h2>", timing_table(rows),
             "<h2>Plots</h2>", *(embed_png(p) for p in pngs), "</body></html>"]
    path = os.path.join(out_dir, "compare.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(body))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="--out directories of earlier load tests")
    p.add_argument("--labels", default=None, help="comma-separated names for the runs (default: directory names)")
    p.add_argument("--out", default="compare", help="where compare.html goes")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [os.path.basename(d.rstrip("/")) for d in args.dirs]
    if len(labels) != len(args.dirs):
        p.error("--labels needs one name per directory")
    print(write_comparison({label: load(d) for label, d in zip(labels, args.dirs)}, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
