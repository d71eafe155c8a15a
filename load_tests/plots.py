"""PNG plots of a load-test report (matplotlib, headless)."""

from __future__ import annotations

import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict, out_dir: str) -> list[str]:
    """latency_cdf.png and timeline.png for the last run; sweep.png when several rates ran."""
    plt = _pyplot()
    paths = []
    run = report["runs"][-1]
    ok = [r for r in run["requests"] if r["status"] == 200 and r["error"] is None and r["end_s"] is not None]

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    series = {"TTFT": [r["ttft_s"] for r in ok if r["ttft_s"] is not None],
              "TPOT": [r["tpot_s"] for r in ok if r["tpot_s"] is not None],
              "ITL": [b - a for r in ok for a, b in zip(r["chunk_times_s"], r["chunk_times_s"][1:])],
              "E2E": [r["e2e_s"] for r in ok if r["e2e_s"] is not None]}
    for ax, (name, values) in zip(axes, series.items()):
        values = sorted(v * 1e3 for v in values)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    fig.suptitle(f"request rate {run['request_rate']}")
    fig.tight_layout()
    paths.append(_save(fig, out_dir, "latency_cdf.png"))
    plt.close(fig)

    # Tokens/s and requests in flight over time. A chunk may carry several tokens: each
    # request's tokens are spread evenly over its chunks.
    end = max((r["end_s"] for r in ok), default=0.0)
    if end > 0:
        bins = 60
        width = end / bins
        tokens = [0.0] * bins
        in_flight = [0] * bins
        for r in ok:
            chunks = r["chunk_times_s"]
            per_chunk = r["output_tokens"] / len(chunks) if chunks else 0.0
            for t in chunks:
                tokens[min(bins - 1, int(t / width))] += per_chunk
            for b in range(int(r["send_s"] / width), min(bins, int(r["end_s"] / width) + 1)):
                in_flight[b] += 1
        centers = [(i + 0.5) * width for i in range(bins)]
        fig, ax1 = plt.subplots(figsize=(8, 3.6))
        ax1.plot(centers, [t / width for t in tokens], color="tab:blue", label="output tokens/s")
        ax1.set_xlabel("time (s)")
        ax1.set_ylabel("output tokens/s", color="tab:blue")
        ax2 = ax1.twinx()
        ax2.step(centers, in_flight, color="tab:orange", where="mid", label="requests in flight")
        ax2.set_ylabel("requests in flight (client view)", color="tab:orange")
        ax1.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "timeline.png"))
        plt.close(fig)

    if len(report["runs"]) > 1:
        labels = [str(r["request_rate"]) for r in report["runs"]]
        throughput = [r["summary"]["output_token_throughput"] for r in report["runs"]]
        p99_ttft = [r["summary"]["ttft_ms"]["p99"] or 0.0 for r in report["runs"]]
        fig, ax1 = plt.subplots(figsize=(7, 3.6))
        x = list(range(len(labels)))
        ax1.plot(x, throughput, "o-", color="tab:blue")
        ax1.set_ylabel("output tokens/s", color="tab:blue")
        ax1.set_xticks(x, labels)
        ax1.set_xlabel("request rate (req/s)")
        ax2 = ax1.twinx()
        ax2.plot(x, p99_ttft, "s--", color="tab:red")
        ax2.set_ylabel("p99 TTFT (ms)", color="tab:red")
        ax1.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(_save(fig, out_dir, "sweep.png"))
        plt.close(fig)
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=100)
    return path
