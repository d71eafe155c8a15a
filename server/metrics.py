"""Prometheus metrics and a JSON latency summary, fed by the engine's step outputs.

Each app owns its own registry (no module-level state), so tests can run
several servers in one process. With several API processes (`--api-server-count`) the metrics
live in prometheus_client's multiprocess files instead (PROMETHEUS_MULTIPROC_DIR, set by the
process that starts them), and /metrics in any of them reads the files of all: counters and
histograms add up, the engine's gauges are the latest report's.
"""

from __future__ import annotations

import os
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from engine.async_engine import AsyncEngine
from engine.llm_engine import RequestOutput, StepStats

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
SUMMARY_WINDOW = 10_000


def _resident_bytes() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Tracked:
    __slots__ = ("last_token_time_s",)

    def __init__(self) -> None:
        self.last_token_time_s: float | None = None


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, multiprocess_dir: str | None = None) -> None:
        self.engine = engine
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        r = self.registry
        p = "roseinfer_"
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Mean time per output token after the first, per request", buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between consecutive output tokens", buckets=LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to finish", buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue = Histogram(p + "request_queue_time_seconds", "Arrival to first scheduled", buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_len = Histogram(p + "request_prompt_tokens", "Prompt length", buckets=TOKEN_BUCKETS, registry=r)
        self.gen_len = Histogram(p + "request_generation_tokens", "Generated length", buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(p + "request_success", "Finished requests", ["finished_reason"], registry=r)
        self.preemptions = Counter(p + "num_preemptions", "Sequences preempted (recompute)", registry=r)
        self.prefix_queries = Counter(p + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter(p + "prefix_cache_hits", "Prompt tokens served from the prefix cache", registry=r)
        gauges = (("num_requests_running", "Requests in the running batch", lambda: engine.stats().num_running),
                  ("num_requests_waiting", "Requests queued", lambda: engine.stats().num_waiting + len(engine._pending_adds)),
                  ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", lambda: engine.stats().kv_cache_usage))
        self._engine_gauges: list[tuple[Gauge, object]] = []
        if multiprocess_dir is None:
            ProcessCollector(registry=r)  # process_resident_memory_bytes etc.: soak tests watch it
            # Read at scrape time from the engine's live stats (in one process: computed now; with
            # an engine process: as of its latest report, which follows every step and every abort).
            for name, doc, read in gauges:
                Gauge(p + name, doc, registry=r).set_function(read)
        else:
            # A function gauge lives in one process's memory: set the shared files on every report.
            self._engine_gauges = [(Gauge(p + name, doc, registry=r, multiprocess_mode="mostrecent"), read)
                                   for name, doc, read in gauges]
            # ProcessCollector's would describe whichever process answered: the API processes' sum,
            # each refreshed at most once a second.
            self._rss = Gauge("process_resident_memory_bytes", "Resident memory of the API processes", registry=r,
                              multiprocess_mode="sum")
            self._rss_time_s = 0.0
        self._seen_preemptions = 0
        self._seen_prefix = (0, 0)
        self._tracked: dict[str, _Tracked] = {}
        self.samples: dict[str, deque[float]] = {k: deque(maxlen=SUMMARY_WINDOW) for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s", "queue_s")}
        engine.step_listeners.append(self.on_step)

    def exposition(self) -> bytes:
        """The Prometheus text for /metrics: this registry, or every API process's files."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)

    def on_step(self, stats: StepStats, outputs: list[RequestOutput]) -> None:
        if self.multiprocess_dir is not None:
            for gauge, read in self._engine_gauges:
                gauge.set(read())
            if time.monotonic() - self._rss_time_s >= 1.0:
                self._rss.set(_resident_bytes())
                self._rss_time_s = time.monotonic()
        if stats.num_preemptions > self._seen_preemptions:
            self.preemptions.inc(stats.num_preemptions - self._seen_preemptions)
            self._seen_preemptions = stats.num_preemptions
        q, h = stats.prefix_cache_queries, stats.prefix_cache_hits
        self.prefix_queries.inc(q - self._seen_prefix[0])
        self.prefix_hits.inc(h - self._seen_prefix[1])
        self._seen_prefix = (q, h)
        for out in outputs:
            self._on_output(out)

    def _observe(self, key: str, hist: Histogram, value: float) -> None:
        hist.observe(value)
        self.samples[key].append(value)

    def _on_output(self, out: RequestOutput) -> None:
        tracked = self._tracked.get(out.request_id)
        if tracked is None:
            tracked = self._tracked[out.request_id] = _Tracked()
            if out.first_token_time_s is not None:
                self._observe("ttft_s", self.ttft, out.first_token_time_s - out.arrival_time_s)
            if out.first_scheduled_time_s is not None:
                self._observe("queue_s", self.queue, out.first_scheduled_time_s - out.arrival_time_s)
            self.prompt_tokens.inc(out.num_prompt_tokens)
        if out.new_token_ids and out.token_time_s is not None:
            self.generation_tokens.inc(len(out.new_token_ids))
            if tracked.last_token_time_s is not None:
                self._observe("itl_s", self.itl, out.token_time_s - tracked.last_token_time_s)
            tracked.last_token_time_s = out.token_time_s
        if not out.finished:
            return
        self._tracked.pop(out.request_id, None)
        self.requests.labels(out.finish_reason or "unknown").inc()
        if out.finish_reason == "abort" or out.finished_time_s is None:
            return
        self.prompt_len.observe(out.num_prompt_tokens)
        self.gen_len.observe(out.num_output_tokens)
        self._observe("e2e_s", self.e2e, out.finished_time_s - out.arrival_time_s)
        if out.num_output_tokens > 1 and out.first_token_time_s is not None:
            tpot = (out.finished_time_s - out.first_token_time_s) / (out.num_output_tokens - 1)
            self._observe("tpot_s", self.tpot, tpot)

    def _summary_from_histograms(self) -> dict:
        """Count, mean and percentiles of every latency from all API processes' histograms; the
        percentiles interpolate inside a bucket, as Prometheus's histogram_quantile does."""
        names = {self.ttft: "ttft_s", self.tpot: "tpot_s", self.itl: "itl_s", self.e2e: "e2e_s", self.queue: "queue_s"}
        by_name = {hist.describe()[0].name: key for hist, key in names.items()}
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        result = {}
        for family in registry.collect():
            key = by_name.get(family.name)
            if key is None:
                continue
            buckets = sorted((float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket"))
            count = next((s.value for s in family.samples if s.name.endswith("_count")), 0.0)
            total = next((s.value for s in family.samples if s.name.endswith("_sum")), 0.0)
            if not count:
                result[key] = {"count": 0}
                continue

            def quantile(q: float) -> float:
                rank, lower, below = q * count, 0.0, 0.0
                for upper, cumulative in buckets:
                    if cumulative >= rank:
                        if upper == float("inf"):
                            return lower
                        return lower + (upper - lower) * (rank - below) / max(cumulative - below, 1e-12)
                    lower, below = upper, cumulative
                return lower

            result[key] = {"count": int(count), "mean": total / count, "p50": quantile(0.5), "p90": quantile(0.9),
                           "p99": quantile(0.99)}
        return result

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float:
            idx = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
            return values[idx]

        result = {}
        if self.multiprocess_dir is not None:  # only the shared histograms see every API process
            result = self._summary_from_histograms()
        for key, dq in self.samples.items():
            if key in result:
                continue
            values = sorted(dq)
            if not values:
                result[key] = {"count": 0}
                continue
            result[key] = {
                "count": len(values),
                "mean": sum(values) / len(values),
                "p50": pct(values, 50),
                "p90": pct(values, 90),
                "p99": pct(values, 99),
            }
        stats = self.engine.stats()
        result["engine"] = {
            "running": stats.num_running,
            "waiting": stats.num_waiting,
            "kv_cache_usage": stats.kv_cache_usage,
            "num_preemptions": stats.num_preemptions,
        }
        return result
