"""Prometheus metrics and a JSON latency summary, fed by the engine's step outputs.

Each app owns its own registry (no module-level state), so tests can run
several servers in one process.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from engine.async_engine import AsyncEngine
from engine.llm_engine import RequestOutput, StepStats

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
SUMMARY_WINDOW = 10_000


class _Tracked:
    __slots__ = ("last_token_time_s",)

    def __init__(self) -> None:
        self.last_token_time_s: float | None = None


class ServerMetrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
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
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc.: soak tests watch it
        # Read at scrape time from the engine's live stats (in one process: computed now; with an
        # engine process: as of its latest report, which follows every step and every abort).
        Gauge(p + "num_requests_running", "Requests in the running batch", registry=r).set_function(
            lambda: engine.stats().num_running)
        Gauge(p + "num_requests_waiting", "Requests queued", registry=r).set_function(
            lambda: engine.stats().num_waiting + len(engine._pending_adds)
        )
        Gauge(p + "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", registry=r).set_function(
            lambda: engine.stats().kv_cache_usage)
        self._seen_preemptions = 0
        self._seen_prefix = (0, 0)
        self._tracked: dict[str, _Tracked] = {}
        self.samples: dict[str, deque[float]] = {k: deque(maxlen=SUMMARY_WINDOW) for k in ("ttft_s", "tpot_s", "itl_s", "e2e_s", "queue_s")}
        engine.step_listeners.append(self.on_step)

    def on_step(self, stats: StepStats, outputs: list[RequestOutput]) -> None:
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

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float:
            idx = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
            return values[idx]

        result = {}
        for key, dq in self.samples.items():
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
