"""Plots of a load-test report (matplotlib, headless) and the self-contained HTML report.

Every figure is titled with the server, model, workload and rate it shows. The timeline bins
tokens in windows sized to the run (about 40 a run, never under 50 ms), so the rate reads as a
rate, not as the arrival pattern of chunks; its axes start at 0.
"""

from __future__ import annotations

import base64
import html
import math
import os
import time

from load_tests.client import TIMING_PARTS

# The parts of a request's time that add up to its end-to-end latency.
STACKED_PARTS = ("queue", "prefill", "decode")
COLORS = {"queue": "tab:gray", "prefill": "tab:orange", "decode": "tab:blue"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def workload_label(config: dict) -> str:
    """The workload in a few words, from the run's config."""
    dataset = config.get("dataset") or ["random"]
    kind = dataset[0]
    if kind == "file":
        what = f"file {os.path.basename(dataset[1]) if len(dataset) > 1 else ''}"
    else:
        what = f"random {config.get('input_len_range') or config.get('input_len')} in"
        if config.get("shared_prefix_len"):
            what += f" (shared {config['shared_prefix_len']})"
    return f"{config.get('endpoint', 'completions')}, {what} / {config.get('output_len')} out, {config.get('num_prompts')} prompts"


def run_title(config: dict, rate) -> str:
    return f"{config.get('base_url', '?')} · {config.get('model', '?')} · {workload_label(config)} · rate {rate} req/s"


def ok_requests(run: dict) -> list[dict]:
    return [r for r in run["requests"] if r["status"] == 200 and r["error"] is None and r["end_s"] is not None]


def plot_latency_cdfs(axes, ok: list[dict], label: str | None = None) -> None:
    """TTFT, TPOT, inter-chunk and end-to-end latency CDFs (ms) of `ok` requests on four axes;
    called once per run to overlay several."""
    series = {"TTFT": [r["ttft_s"] for r in ok if r["ttft_s"] is not None],
              "TPOT": [r["tpot_s"] for r in ok if r["tpot_s"] is not None],
              "ITL": [b - a for r in ok for a, b in zip(r["chunk_times_s"], r["chunk_times_s"][1:])],
              "E2E": [r["e2e_s"] for r in ok if r["e2e_s"] is not None]}
    for ax, (name, values) in zip(axes, series.items()):
        values = sorted(v * 1e3 for v in values)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if label is not None:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("fraction of requests")


def window_s(duration_s: float) -> float:
    """Timeline windows: about 40 over the run, at least 50 ms (chunks arrive every few ms)."""
    return max(0.05, duration_s / 40)


def tokens_per_s_timeline(ok: list[dict], duration_s: float) -> tuple[list[float], list[float], list[int]]:
    """(window centres, output tokens/s, requests in flight at the centre) over the run; a
    request's tokens are spread evenly over its chunks (a chunk may carry several)."""
    width = window_s(duration_s)
    bins = max(1, math.ceil(duration_s / width))
    tokens = [0.0] * bins
    for r in ok:
        chunks = r["chunk_times_s"]
        per_chunk = r["output_tokens"] / len(chunks) if chunks else 0.0
        for t in chunks:
            tokens[min(bins - 1, int(t / width))] += per_chunk
    centers = [(i + 0.5) * width for i in range(bins)]
    in_flight = [sum(1 for r in ok if r["send_s"] <= c < r["end_s"]) for c in centers]
    return centers, [t / width for t in tokens], in_flight


def write_plots(report: dict, out_dir: str) -> list[str]:
    """PNGs for the last run (latency CDFs, timeline, latency over time, server timing split) and,
    when several rates ran, the sweep. Returns their paths."""
    plt = _pyplot()
    config = report.get("config", {})
    run = report["runs"][-1]
    title = run_title(config, run["request_rate"])
    ok = ok_requests(run)
    paths = []

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    plot_latency_cdfs(axes, ok)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "latency_cdf.png"))
    plt.close(fig)

    duration = run["summary"]["duration_s"]
    if ok and duration > 0:
        centers, rate, in_flight = tokens_per_s_timeline(ok, duration)
        gauges = run.get("gauges") or []
        fig, axes = plt.subplots(1, 2 if gauges else 1, figsize=(14 if gauges else 8, 3.8), squeeze=False)
        ax1 = axes[0][0]
        ax1.plot(centers, rate, color="tab:blue")
        ax1.set_xlabel("time (s)")
        ax1.set_ylabel(f"output tokens/s ({window_s(duration) * 1e3:.0f} ms windows)", color="tab:blue")
        ax1.set_ylim(bottom=0)
        ax1.set_xlim(0, duration)
        ax2 = ax1.twinx()
        ax2.step(centers, in_flight, color="tab:orange", where="mid")
        ax2.set_ylabel("requests in flight (client)", color="tab:orange")
        ax2.set_ylim(0, max(in_flight + [1]) * 1.1)
        ax1.grid(alpha=0.3)
        ax1.set_title("throughput and concurrency", fontsize=9)
        if gauges:
            ax = axes[0][1]
            t = [g["t_s"] for g in gauges]
            for key, color in (("num_requests_running", "tab:green"), ("num_requests_waiting", "tab:red")):
                ax.step(t, [g.get(key, 0.0) for g in gauges], where="post", color=color, label=key.removeprefix("num_requests_"))
            ax.set_xlabel("time (s)")
            ax.set_ylabel("requests (server gauges)")
            ax.set_ylim(bottom=0)
            ax.set_xlim(0, max(duration, t[-1]))
            ax.legend(loc="upper right")
            ax.grid(alpha=0.3)
            ax.set_title("server: running and waiting", fontsize=9)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "timeline.png"))
        plt.close(fig)

        fig, axes = plt.subplots(1, 2, figsize=(14, 3.8))
        for ax, (key, name) in zip(axes, (("ttft_s", "TTFT"), ("tpot_s", "TPOT"))):
            points = [(r["send_s"], r[key] * 1e3) for r in ok if r[key] is not None]
            if points:
                ax.scatter(*zip(*points), s=8, alpha=0.6)
            ax.set_xlabel("request sent at (s)")
            ax.set_ylabel(f"{name} (ms)")
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"{name} over time", fontsize=9)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "latency_over_time.png"))
        plt.close(fig)

    timing = run["summary"].get("server_timing_ms")
    if timing:
        fig, ax = plt.subplots(figsize=(8, 3.8))
        levels = ("median", "p90", "p99")
        bottom = [0.0] * len(levels)
        for part in STACKED_PARTS:
            values = [timing[part][lv] or 0.0 for lv in levels]
            ax.bar(levels, values, bottom=bottom, color=COLORS[part], label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel("ms (each part's own percentile)")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        ax.set_title("where the time went (server's clock)", fontsize=9)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "server_timing.png"))
        plt.close(fig)

    if len(report["runs"]) > 1:
        paths.append(write_sweep_plot(plt, {os.path.basename(out_dir.rstrip("/")) or "run": report}, out_dir, "sweep.png"))
    return paths


def sweep_points(report: dict) -> dict[str, list[float]]:
    """Per rate: throughput, goodput, TTFT and TPOT percentiles (ms)."""
    runs = report["runs"]
    return {
        "rate": [r["request_rate"] for r in runs],
        "throughput": [r["summary"]["output_token_throughput"] for r in runs],
        "goodput": [r["summary"]["goodput_request_throughput"] for r in runs],
        "ttft_p50": [r["summary"]["ttft_ms"]["median"] or 0.0 for r in runs],
        "ttft_p99": [r["summary"]["ttft_ms"]["p99"] or 0.0 for r in runs],
        "tpot_p50": [r["summary"]["tpot_ms"]["median"] or 0.0 for r in runs],
        "tpot_p99": [r["summary"]["tpot_ms"]["p99"] or 0.0 for r in runs],
    }


def write_sweep_plot(plt, reports: dict[str, dict], out_dir: str, name: str) -> str:
    """Throughput, goodput, TTFT and TPOT against the request rate, one line per report."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 7))
    first = next(iter(reports.values()))
    labels = [str(r["request_rate"]) for r in first["runs"]]
    for label, report in reports.items():
        pts = sweep_points(report)
        x = list(range(len(pts["rate"])))
        axes[0][0].plot(x, pts["throughput"], "o-", label=label)
        axes[0][1].plot(x, pts["goodput"], "o-", label=label)
        line = axes[1][0].plot(x, pts["ttft_p50"], "o-", label=f"{label} p50")[0]
        axes[1][0].plot(x, pts["ttft_p99"], "s--", color=line.get_color(), label=f"{label} p99")
        line = axes[1][1].plot(x, pts["tpot_p50"], "o-", label=f"{label} p50")[0]
        axes[1][1].plot(x, pts["tpot_p99"], "s--", color=line.get_color(), label=f"{label} p99")
    for ax, ylabel in zip((axes[0][0], axes[0][1], axes[1][0], axes[1][1]),
                          ("output tokens/s", "goodput (req/s within the SLO)", "TTFT (ms)", "TPOT (ms)")):
        ax.set_xticks(list(range(len(labels))), labels)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    config = first.get("config", {})
    fig.suptitle(f"{config.get('model', '?')} · {workload_label(config)} · rates {', '.join(labels)}", fontsize=9)
    fig.tight_layout()
    path = _save(fig, out_dir, name)
    plt.close(fig)
    return path


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=100)
    return path


# ---- the HTML report ------------------------------------------------------------------------------
_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
          "td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}")


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.2f}" if isinstance(v, float) else html.escape(str(v))


def summary_table(rows: list[tuple[str, dict]]) -> str:
    """One row per run: throughput, and mean/p50/p90/p99 of each latency."""
    head = ("<tr><th>run</th><th>done/failed</th><th>duration s</th><th>req/s</th><th>out tok/s</th><th>goodput req/s</th>"
            + "".join(f"<th>{m} {p}</th>" for m in ("TTFT", "TPOT", "ITL", "E2E") for p in ("p50", "p90", "p99"))
            + "</tr>")
    body = []
    for label, s in rows:
        cells = [f"{s['completed']}/{s['failed']}", s["duration_s"], s["request_throughput"], s["output_token_throughput"],
                 s["goodput_request_throughput"]]
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            cells += [s[key]["median"], s[key]["p90"], s[key]["p99"]]
        body.append(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def timing_table(rows: list[tuple[str, dict]]) -> str:
    """Each run's server-side split: p50/p90/p99 of queue, prefill, decode, TTFT, E2E (ms)."""
    head = "<tr><th>run</th>" + "".join(f"<th>{p} {lv}</th>" for p in TIMING_PARTS for lv in ("p50", "p90", "p99")) + "</tr>"
    body = []
    for label, s in rows:
        timing = s.get("server_timing_ms")
        if not timing:
            continue
        cells = [timing[p][lv] for p in TIMING_PARTS for lv in ("median", "p90", "p99")]
        body.append(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>" if body else "<p>No server timing (a server other than roseinfer, or --no-timing).</p>"


def embed_png(path: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,{data}">'


def write_report_html(report: dict, out_dir: str, png_paths: list[str], name: str = "report.html") -> str:
    """One HTML file with the plots inside (base64), the summary and timing tables and the config:
    a browser opens it with no server."""
    config = report.get("config", {})
    rows = [(f"rate {r['request_rate']}", r["summary"]) for r in report["runs"]]
    config_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                          for k, v in sorted(config.items()))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>load test: {html.escape(config.get('model', ''))}"
             f"</title><style>{_STYLE}</style></head><body>",
             f"<h1>Load test: {html.escape(str(config.get('model', '?')))} at {html.escape(str(config.get('base_url', '?')))}</h1>",
             f"<p>{html.escape(workload_label(config))}; written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
             "<h2>Summary (latencies in ms)</h2>", summary_table(rows),
             "<h2>Where the time went (server's clock, ms)</h2>", timing_table(rows),
             "<h2>Plots</h2>", *(embed_png(p) for p in png_paths),
             f"<h2>Config</h2><table>{config_rows}</table></body></html>"]
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
