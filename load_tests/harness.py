"""`python -m load_tests` / `roseinfer loadtest`: load an OpenAI-compatible server over HTTP and
report throughput, latency percentiles, goodput and errors; optionally sweep request rates.

    python -m load_tests --base-url http://127.0.0.1:8000 --model gpt2 --dataset random \\
        --input-len 128 --output-len 256 --num-prompts 512 --sweep-rates 8,32,128,inf --out results/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import httpx

from load_tests.client import TIMING_PARTS, RequestRecord, request_body, stream_request
from load_tests.workload import (RequestSpec, arrival_offsets_s, file_workload, random_text_workload,
                                 random_token_workload)


@dataclass(frozen=True)
class SLO:
    """Goodput thresholds in seconds (None: not checked)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def met_by(self, r: RequestRecord) -> bool:
        checks = ((self.ttft_s, r.ttft_s), (self.tpot_s, r.tpot_s), (self.e2e_s, r.e2e_s))
        return r.ok and all(limit is None or (value is not None and value <= limit) for limit, value in checks)


def parse_slo(text: str | None) -> SLO:
    """`ttft=500,tpot=50` in milliseconds."""
    if not text:
        return SLO()
    limits = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip().lower()
        if key not in ("ttft", "tpot", "e2e") or not value:
            raise argparse.ArgumentTypeError(f"bad SLO {part!r}: use ttft=MS,tpot=MS,e2e=MS")
        limits[f"{key}_s"] = float(value) / 1e3
    return SLO(**limits)


def percentiles(values: list[float]) -> dict:
    """mean, median, p90, p99 (nearest rank on sorted values), in the values' unit."""
    if not values:
        return {"count": 0, "mean": None, "median": None, "p90": None, "p99": None}
    v = sorted(values)

    def rank(q: float) -> float:
        return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]

    return {"count": len(v), "mean": statistics.fmean(v), "median": statistics.median(v), "p90": rank(90), "p99": rank(99)}


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO) -> dict:
    ok = [r for r in records if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    errors = Counter(str(r.status) if r.status else "connection" for r in records if not r.ok)
    return {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors_by_status": dict(errors),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_token_throughput": output / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (output + prompt) / duration_s if duration_s > 0 else 0.0,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "goodput_request_throughput": sum(slo.met_by(r) for r in ok) / duration_s if duration_s > 0 else 0.0,
        "slo": {k: v for k, v in vars(slo).items() if v is not None},
        "ttft_ms": _ms(percentiles([r.ttft_s for r in ok if r.ttft_s is not None])),
        "tpot_ms": _ms(percentiles([r.tpot_s for r in ok if r.tpot_s is not None])),
        "itl_ms": _ms(percentiles([g for r in ok for g in r.itls_s])),
        "e2e_ms": _ms(percentiles([r.e2e_s for r in ok if r.e2e_s is not None])),
        # The server's own split of each request's time (roseinfer's timing), percentile by percentile.
        "server_timing_ms": {part: percentiles([r.server_timing_ms[part] for r in ok if r.server_timing_ms])
                             for part in TIMING_PARTS} if any(r.server_timing_ms for r in ok) else None,
    }


def _ms(p: dict) -> dict:
    return {k: (v * 1e3 if k != "count" and v is not None else v) for k, v in p.items()}


# ---- server metrics ---------------------------------------------------------------------------
_HIST_NAMES = {"ttft": ("roseinfer_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
               "tpot": ("roseinfer_time_per_output_token_seconds", "vllm:time_per_output_token_seconds"),
               "e2e": ("roseinfer_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds")}


def parse_histogram_sums(metrics_text: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram family in Prometheus text, labels summed over."""
    out: dict[str, list[float]] = {}
    for line in metrics_text.splitlines():
        m = re.match(r"^([A-Za-z_:][\w:]*)_(sum|count)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
        if m:
            acc = out.setdefault(m.group(1), [0.0, 0.0])
            acc[0 if m.group(2) == "sum" else 1] += float(m.group(4))
    return {k: (v[0], v[1]) for k, v in out.items()}


def server_side_means_ms(before: str, after: str) -> dict:
    """Mean server-side TTFT/TPOT/E2E over the run, from the histogram deltas."""
    b, a = parse_histogram_sums(before), parse_histogram_sums(after)
    result = {}
    for key, names in _HIST_NAMES.items():
        for name in names:
            if name in a:
                s, c = a[name][0] - b.get(name, (0, 0))[0], a[name][1] - b.get(name, (0, 0))[1]
                result[f"{key}_mean_ms"] = s / c * 1e3 if c > 0 else None
                break
    return result


# ---- one run ------------------------------------------------------------------------------
def run_load(base_url: str, model: str, specs: list[RequestSpec], endpoint: str, request_rate: float,
             burstiness: float, max_concurrency: int | None, seed: int, temperature: float = 0.0,
             api_key: str | None = None, timeout_s: float = 600.0, progress: bool = True,
             client_processes: int = 1, timing: bool = True) -> tuple[list[RequestRecord], float]:
    """Send every spec at its arrival time (bounded by max_concurrency) and stream them all.

    With `client_processes` > 1 the requests are dealt round-robin to that many processes, each
    with its own event loop and connection pool (and max_concurrency / N): one Python client
    spends about half as much CPU per request as our server (docs/BENCHMARKS.md), so against a
    fast server its own send loop becomes part of what it measures. Every process times against
    the same monotonic clock and starts at the same instant, so records and the duration mean
    the same as with one."""
    offsets = arrival_offsets_s(len(specs), request_rate, burstiness, seed)
    if client_processes <= 1:
        return asyncio.run(run_once(base_url, model, specs, offsets, endpoint, request_rate, max_concurrency, temperature,
                                    api_key, timeout_s, progress, timing=timing))
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"  # the client holds no CUDA, no threads
    start = time.perf_counter() + (0.5 if method == "fork" else 5.0)  # every shard begins here
    per_shard = None if not max_concurrency else -(-max_concurrency // client_processes)
    shards = [list(range(i, len(specs), client_processes)) for i in range(client_processes)]
    with ProcessPoolExecutor(client_processes, mp_context=mp.get_context(method)) as pool:
        futures = [pool.submit(_run_shard, base_url, model, [specs[j] for j in idx], [offsets[j] for j in idx], endpoint,
                               request_rate, per_shard, temperature, api_key, timeout_s, start, timing) for idx in shards]
        results = [f.result() for f in futures]
    # The run ends when the last shard's last stream does, on the shared clock: not after the
    # records travel back and the pool's processes exit, which would count the harness's own
    # teardown (tens of ms, a few percent of a short burst) against the server.
    records = [r for shard_records, _ in results for r in shard_records]
    return sorted(records, key=lambda r: r.index), max(duration for _, duration in results)


def _run_shard(base_url, model, specs, offsets, endpoint, request_rate, max_concurrency, temperature, api_key, timeout_s,
               start, timing) -> tuple[list[RequestRecord], float]:
    return asyncio.run(run_once(base_url, model, specs, offsets, endpoint, request_rate, max_concurrency, temperature,
                                api_key, timeout_s, progress=False, start=start, timing=timing))


async def run_once(base_url: str, model: str, specs: list[RequestSpec], offsets: list[float], endpoint: str,
                   request_rate: float, max_concurrency: int | None, temperature: float = 0.0, api_key: str | None = None,
                   timeout_s: float = 600.0, progress: bool = True, start: float | None = None,
                   timing: bool = True) -> tuple[list[RequestRecord], float]:
    """Send each spec at `start` (a time.perf_counter() value; default now) plus its offset, and
    stream them all. Times in the records are seconds from `start`."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc=f"rate {request_rate:g}", unit="req", leave=False)
    connector = aiohttp.TCPConnector(limit=max_concurrency or len(specs) + 8)
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=30.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if start is not None and start > time.perf_counter():
            await asyncio.sleep(start - time.perf_counter())
        t0 = time.perf_counter() if start is None else start

        async def one(spec: RequestSpec, offset: float) -> RequestRecord:
            delay = offset - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is not None:
                await limit.acquire()
            try:
                record = RequestRecord(spec.index, send_s=time.perf_counter() - t0, prompt_tokens=spec.prompt_len or 0)
                return await stream_request(session, base_url, request_body(spec, model, endpoint, temperature, timing),
                                            endpoint, record, t0, headers)
            finally:
                if limit is not None:
                    limit.release()
                if bar is not None:
                    bar.update(1)

        records = await asyncio.gather(*(one(s, o) for s, o in zip(specs, offsets)))
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return list(records), duration


def build_workload(args: argparse.Namespace) -> list[RequestSpec]:
    specs = _prompts(args)
    extra = _extra_body(getattr(args, "extra_body", None))
    for spec in specs:  # the same fields in every request (e.g. a JSON schema to hold them to)
        spec.extra = {**extra, **spec.extra}
    return specs


def _extra_body(text: str | None) -> dict:
    if not text:
        return {}
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--extra-body is not JSON: {exc}") from None
    if not isinstance(extra, dict):
        raise SystemExit("--extra-body is a JSON object")
    return extra


def _prompts(args: argparse.Namespace) -> list[RequestSpec]:
    kind, *rest = args.dataset  # ["random"] or ["file", PATH]
    if kind not in ("random", "file") or len(rest) > 1:
        raise SystemExit("--dataset is 'random' or 'file PATH'")
    if kind == "file":
        if not rest:
            raise SystemExit("--dataset file needs a PATH (--dataset file PATH)")
        return file_workload(rest[0], args.num_prompts, args.output_len, args.endpoint)
    lengths = tuple(int(x) for x in args.input_len_range.split(":")) if args.input_len_range else None
    if args.endpoint == "chat":
        return random_text_workload(args.num_prompts, args.input_len, args.output_len, args.shared_prefix_len, args.seed,
                                    lengths)
    lo, hi = (int(x) for x in args.token_id_range.split(":"))
    return random_token_workload(args.num_prompts, args.input_len, args.output_len, args.shared_prefix_len, (lo, hi),
                                 args.seed, lengths)


def parse_rate(text: str) -> float:
    return math.inf if text.strip().lower() in ("inf", "infinity") else float(text)


def rate_json(rate: float) -> float | str:
    """JSON has no infinity: an unbounded rate is written as "inf"."""
    return "inf" if math.isinf(rate) else rate


def format_summary(summary: dict, rate: float | str) -> str:
    lines = [f"{'=' * 16} load test: request rate {rate} {'=' * 16}",
             f"{'Requests completed / failed:':<40}{summary['completed']} / {summary['failed']}"
             + (f"  {summary['errors_by_status']}" if summary["errors_by_status"] else ""),
             f"{'Duration (s):':<40}{summary['duration_s']:.2f}",
             f"{'Request throughput (req/s):':<40}{summary['request_throughput']:.2f}",
             f"{'Output token throughput (tok/s):':<40}{summary['output_token_throughput']:.1f}",
             f"{'Total token throughput (tok/s):':<40}{summary['total_token_throughput']:.1f}"]
    if summary["slo"]:
        lines.append(f"{'Goodput (req/s):':<40}{summary['goodput_request_throughput']:.2f}")
    lines.append(f"{'':<14}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
    for key, label in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"), ("e2e_ms", "E2E (ms)")):
        p = summary[key]
        cells = "".join(f"{p[k]:>10.2f}" if p[k] is not None else f"{'-':>10}" for k in ("mean", "median", "p90", "p99"))
        lines.append(f"{label:<14}{cells}")
    timing = summary.get("server_timing_ms")
    if timing:
        lines.append("where the time went, server's clock (ms):")
        for part in TIMING_PARTS:
            p = timing[part]
            cells = "".join(f"{p[k]:>10.2f}" if p[k] is not None else f"{'-':>10}" for k in ("mean", "median", "p90", "p99"))
            lines.append(f"{'  ' + part:<14}{cells}")
    server = summary.get("server_side")
    if server:
        lines.append("server-side means (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in server.items() if v is not None))
    return "\n".join(lines)


def add_loadtest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the name the server serves")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--dataset", nargs="+", default=["random"], metavar=("random|file", "PATH"),
                   help="random (token-id prompts) or 'file PATH' (JSONL of prompt/messages)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--shared-prefix-len", type=int, default=0, help="random prompts share this many leading tokens")
    p.add_argument("--input-len-range", default=None, metavar="LO:HI",
                   help="random prompts: the part past the shared prefix is LO..HI tokens, uniformly (replaces --input-len)")
    p.add_argument("--token-id-range", default="1000:20000", help="LO:HI of random token ids (inside any vocabulary)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=parse_rate, default=math.inf, help="requests/s (Poisson); inf: all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson, <1 burstier")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--extra-body", default=None, metavar="JSON",
                   help="fields merged into every request, e.g. '{\"response_format\": {...}}' or vLLM's '{\"guided_json\": {...}}'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", default=None, help="goodput thresholds in ms, e.g. ttft=500,tpot=50")
    p.add_argument("--sweep-rates", default=None, help="comma-separated rates (inf allowed): one run each, plus plots")
    p.add_argument("--scrape-metrics", action="store_true",
                   help="read /metrics before and after (server-side latencies) and every 0.25 s (running/waiting)")
    p.add_argument("--no-timing", dest="timing", action="store_false",
                   help="do not ask for roseinfer's per-request timing (for servers that refuse unknown fields)")
    p.add_argument("--out", default=None, help="directory for results.json and PNG plots")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--client-processes", type=int, default=1,
                   help="send from N processes (requests dealt round-robin; max-concurrency split): for servers "
                        "fast enough that one Python client's own CPU would limit the measurement")


def run_from_args(args: argparse.Namespace) -> dict:
    """Run the load test(s) described by `args`; write --out; return the whole report."""
    slo = parse_slo(args.slo)
    specs = build_workload(args)
    rates = [parse_rate(r) for r in args.sweep_rates.split(",")] if args.sweep_rates else [args.request_rate]
    runs = []
    for rate in rates:
        before = _scrape(args.base_url) if args.scrape_metrics else None
        with GaugeSampler(args.base_url if args.scrape_metrics else None) as gauges:
            records, duration = run_load(
                args.base_url, args.model, specs, args.endpoint, rate, args.burstiness, args.max_concurrency, args.seed,
                args.temperature, args.api_key, args.timeout, progress=not args.no_progress,
                client_processes=args.client_processes, timing=args.timing)
        summary = summarize(records, duration, slo)
        if before is not None:
            summary["server_side"] = server_side_means_ms(before, _scrape(args.base_url))
        runs.append({"request_rate": rate_json(rate), "summary": summary, "requests": [r.to_json() for r in records],
                     "gauges": gauges.samples})
    config = {k: (rate_json(v) if isinstance(v, float) else v) for k, v in vars(args).items() if k != "func"}
    report = {"config": config, "runs": runs}
    if args.out:
        write_outputs(report, args.out)
    for run in runs:
        print(format_summary(run["summary"], run["request_rate"]), flush=True)
    return report


def write_outputs(report: dict, out_dir: str) -> None:
    import os

    from load_tests.plots import write_plots, write_report_html

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, allow_nan=False)
    write_report_html(report, out_dir, write_plots(report, out_dir))


def _scrape(base_url: str) -> str:
    return httpx.get(base_url.rstrip("/") + "/metrics", timeout=30).text


def gauge_values(metrics_text: str) -> dict[str, float]:
    """Requests running and waiting, and KV-cache use, from Prometheus text (ours or vLLM's names)."""
    out = {}
    for line in metrics_text.splitlines():
        m = re.match(r"^(?:roseinfer_|vllm:)(num_requests_running|num_requests_waiting|kv_cache_usage_perc)"
                     r"(?:\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


class GaugeSampler:
    """Reads the server's gauges every `period_s` while a run goes on (a thread, its own clock from
    the run's start, within milliseconds): requests running and waiting over time for the plots.
    With no base URL it samples nothing."""

    def __init__(self, base_url: str | None, period_s: float = 0.25) -> None:
        self.base_url, self.period_s = base_url, period_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GaugeSampler:
        if self.base_url is not None:
            self._t0 = time.perf_counter()
            self._thread = threading.Thread(target=self._run, name="gauge-sampler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                t = time.perf_counter() - self._t0
                try:
                    values = gauge_values(client.get(self.base_url.rstrip("/") + "/metrics").text)
                except httpx.HTTPError:
                    values = {}
                if values:
                    self.samples.append({"t_s": round(t, 3), **values})
                self._stop.wait(self.period_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def cmd_loadtest(args: argparse.Namespace) -> int:
    """Exit status 1 when some rate completed no request at all."""
    report = run_from_args(args)
    return 0 if all(r["summary"]["completed"] > 0 for r in report["runs"]) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests", description=__doc__.split("\n\n")[0])
    add_loadtest_args(p)
    return cmd_loadtest(p.parse_args(argv))
