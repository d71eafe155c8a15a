"""Robustness checks against a running OpenAI-compatible server: bad input (listed cases and a
fuzz run), dropped streams, overload and a bounded soak. Every check is bounded in count and
time, and ends by checking that the server recovered: /health answers and no request, waiting
request or KV block is left behind.

    python -m load_tests.robustness --base-url http://127.0.0.1:8000 --model gpt2 \\
        --checks bad,fuzz,disconnect,overload,soak --max-waiting 8 --soak-seconds 120

A failed check raises AssertionError (exit status 1); the CPU test suite runs the same functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

KV_GAUGES = ("roseinfer_kv_cache_usage_perc", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
RUNNING_GAUGES = ("roseinfer_num_requests_running", "vllm:num_requests_running")
WAITING_GAUGES = ("roseinfer_num_requests_waiting", "vllm:num_requests_waiting")
RSS_METRIC = "process_resident_memory_bytes"


# ---- reading the server's state ---------------------------------------------------------------
def metric_values(base_url: str) -> dict[str, float]:
    """Every unlabelled sample in /metrics, by name (one scrape)."""
    text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            values[parts[0]] = float(parts[1])
    return values


def first_metric(values: dict[str, float], names: tuple[str, ...] | str) -> float | None:
    """The first of `names` present in `values` (a `metric_values` scrape), else None."""
    names = (names,) if isinstance(names, str) else names
    return next((values[n] for n in names if n in values), None)


def metric_value(base_url: str, names: tuple[str, ...] | str) -> float | None:
    """The first of `names` found in /metrics (unlabelled samples only), else None."""
    return first_metric(metric_values(base_url), names)


def assert_recovered(base_url: str, timeout_s: float = 30.0) -> dict:
    """/health is 200 and the running/waiting gauges and KV-cache use are back to zero."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(base_url.rstrip("/") + "/health", timeout=10).status_code
        values = metric_values(base_url)
        state = {"health": health, "kv": first_metric(values, KV_GAUGES),
                 "running": first_metric(values, RUNNING_GAUGES), "waiting": first_metric(values, WAITING_GAUGES)}
        if health == 200 and not state["kv"] and not state["running"] and not state["waiting"]:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"server did not recover within {timeout_s} s: {state}")
        time.sleep(0.05)


def assert_error_object(resp: httpx.Response, case: str) -> None:
    assert 400 <= resp.status_code < 500, f"{case}: expected a 4xx, got {resp.status_code}: {resp.text[:300]}"
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AssertionError(f"{case}: no OpenAI error object in {resp.text[:300]!r}") from exc
    assert set(err) >= {"message", "type", "param", "code"}, f"{case}: error object fields {sorted(err)}"
    assert isinstance(err["message"], str) and err["message"], f"{case}: empty error message"


# ---- bad input -------------------------------------------------------------------------------
def bad_input_cases(model: str, max_model_len: int) -> list[tuple[str, str, bytes | dict, int | None]]:
    """(name, path, body, expected status or None for any 4xx). Bytes bodies are sent raw."""
    c, chat = "/v1/completions", "/v1/chat/completions"
    ok = {"model": model, "prompt": "hello", "max_tokens": 4}
    msgs = [{"role": "user", "content": "hi"}]
    return [
        ("malformed json", c, b'{"model": "x", "prompt": ', 400),
        ("body is a list", c, b"[1, 2, 3]", 400),
        ("body is empty", c, b"", 400),
        ("invalid utf-8", c, b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe\xfd"}', 400),
        ("missing prompt", c, {"model": model}, 400),
        ("max_tokens is a string", c, ok | {"max_tokens": "ten"}, 400),
        ("prompt is a number", c, ok | {"prompt": 12345}, 400),
        ("temperature is a string", c, ok | {"temperature": "hot"}, 400),
        ("n is fractional", c, ok | {"n": 1.5}, 400),
        ("stream is a string", c, ok | {"stream": "yes please"}, 400),
        ("huge max_tokens", c, ok | {"max_tokens": 10**30}, 400),
        ("negative max_tokens", c, ok | {"max_tokens": -5}, 400),
        ("zero max_tokens", c, ok | {"max_tokens": 0}, 400),
        ("negative temperature", c, ok | {"temperature": -1.0}, 400),
        ("top_p above 1", c, ok | {"top_p": 2.0}, 400),
        ("top_p zero", c, ok | {"top_p": 0.0}, 400),
        ("n zero", c, ok | {"n": 0}, 400),
        ("huge n", c, ok | {"n": 10**9}, 400),
        ("logprobs 21", c, ok | {"logprobs": 21}, 400),
        ("huge seed", c, ok | {"seed": 10**40}, 400),
        ("presence_penalty 1e300", c, ok | {"presence_penalty": 1e300}, 400),
        ("logit_bias with a text key", c, ok | {"logit_bias": {"abc": 1}}, 400),
        ("empty prompt", c, ok | {"prompt": ""}, 400),
        ("empty prompt list", c, ok | {"prompt": []}, 400),
        ("token id past the vocabulary", c, ok | {"prompt": [10**9]}, 400),
        ("negative token id", c, ok | {"prompt": [-1, 5]}, 400),
        ("1 MB prompt", c, ok | {"prompt": "a " * 500_000}, 400),
        ("1 MB stop string", c, ok | {"stop": "x" * 1_000_000}, 400),
        ("prompt over the context", c, ok | {"prompt": [1000] * (max_model_len + 1)}, 400),
        ("prompt + max_tokens over the context", c, ok | {"prompt": [1000] * 8, "max_tokens": max_model_len}, 400),
        ("thousands of stop strings", c, ok | {"stop": [f"stop{i}" for i in range(5000)]}, 400),
        ("unknown model", c, ok | {"model": "no-such-model"}, 404),
        ("chat: messages not a list", chat, {"model": model, "messages": "hi"}, 400),
        ("chat: empty messages", chat, {"model": model, "messages": []}, 400),
        ("chat: message without role", chat, {"model": model, "messages": [{"content": "hi"}]}, 400),
        ("chat: unknown role", chat, {"model": model, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ("chat: top_logprobs without logprobs", chat, {"model": model, "messages": msgs, "top_logprobs": 3}, 400),
        ("chat: unknown model", chat, {"model": "no-such-model", "messages": msgs}, 404),
    ]


def check_bad_inputs(base_url: str, model: str, max_model_len: int) -> dict:
    """Every listed bad request gets a 4xx with an OpenAI error object; the server stays healthy."""
    results = {}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for name, path, body, expected in bad_input_cases(model, max_model_len):
            if isinstance(body, bytes):
                resp = client.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                resp = client.post(path, json=body)
            assert_error_object(resp, name)
            if expected is not None:
                assert resp.status_code == expected, f"{name}: expected {expected}, got {resp.status_code}: {resp.text[:300]}"
            results[name] = resp.status_code
    assert_recovered(base_url)
    return results


def check_fuzz(base_url: str, model: str, max_examples: int = 100) -> dict:
    """Random JSON bodies shaped like completions requests (right and wrong types, odd values):
    no answer is a 5xx, every 4xx is an OpenAI error object. A fixed example budget, derandomized
    (the same bodies every run)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
    small_ints = st.integers(-3, 24)
    # Mostly well-formed prompts, so that valid and nearly valid requests also reach the engine.
    prompts = st.text(min_size=1, max_size=40) | st.lists(st.integers(0, 1000), min_size=1, max_size=12) | values
    body = st.fixed_dictionaries({"prompt": prompts}, optional={
        "model": st.just(model) | values,
        "max_tokens": small_ints | values,
        "temperature": st.floats(-1, 3) | values,
        "top_p": st.floats(-0.5, 1.5) | values,
        "top_k": small_ints | values,
        "n": st.integers(-1, 3) | values,
        "stream": st.booleans() | values,
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5) | values,
        "logprobs": small_ints | values,
        "seed": st.integers() | values,
        "echo": st.booleans() | values,
        "logit_bias": st.dictionaries(st.integers(-5, 60000).map(str), st.floats(-150, 150), max_size=3) | values,
        "presence_penalty": st.floats(-3, 3) | values,
        "ignore_eos": st.booleans() | values,
    })
    seen: dict[int, int] = {}
    client = httpx.Client(base_url=base_url, timeout=120)

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body)
    def one(payload: dict) -> None:
        resp = client.post("/v1/completions", json=payload)
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, f"{resp.status_code} for {json.dumps(payload)[:300]}: {resp.text[:300]}"
        if resp.status_code != 200:
            assert_error_object(resp, json.dumps(payload)[:200])

    try:
        one()
    finally:
        client.close()
    assert_recovered(base_url)
    return {"status_counts": seen}


# ---- disconnects -----------------------------------------------------------------------------
@dataclass
class DisconnectReport:
    dropped: int = 0
    survivors_ok: int = 0
    survivors: int = 0
    survivor_tokens_per_s: list[float] = field(default_factory=list)


async def _drop_after(client: httpx.AsyncClient, body: dict, chunks: int) -> None:
    """Open a stream and close the connection after `chunks` SSE lines (0: right after the headers)."""
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        read = 0
        async for line in resp.aiter_lines():
            if read >= chunks:
                break
            if line.startswith("data:"):
                read += 1


async def _complete(client: httpx.AsyncClient, body: dict) -> tuple[int, float]:
    start = time.perf_counter()
    resp = await client.post("/v1/completions", json=body)
    resp.raise_for_status()
    return resp.json()["usage"]["completion_tokens"], time.perf_counter() - start


def check_disconnects(base_url: str, model: str, num_streams: int = 200, max_tokens: int = 64,
                      num_survivors: int = 8, concurrency: int = 32, seed: int = 0) -> DisconnectReport:
    """Streams dropped at random points (before the first chunk up to near the end) while a few
    full requests run beside them: the survivors get every token, nothing leaks or sticks."""
    rng = random.Random(seed)
    report = DisconnectReport(dropped=num_streams, survivors=num_survivors)
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}

    async def main() -> None:
        limits = httpx.Limits(max_connections=concurrency + num_survivors + 4)
        async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
            gate = asyncio.Semaphore(concurrency)

            async def drop(i: int) -> None:
                async with gate:
                    await _drop_after(client, body | {"stream": True, "prompt": f"request {i} says"}, rng.randrange(0, max_tokens // 2))

            survivors = [asyncio.create_task(_complete(client, body)) for _ in range(num_survivors)]
            await asyncio.gather(*(drop(i) for i in range(num_streams)))
            for tokens, seconds in await asyncio.gather(*survivors):
                report.survivors_ok += tokens == max_tokens
                report.survivor_tokens_per_s.append(tokens / seconds)

    asyncio.run(main())
    assert report.survivors_ok == num_survivors, f"only {report.survivors_ok}/{num_survivors} survivors got every token"
    assert_recovered(base_url)
    return report


# ---- overload --------------------------------------------------------------------------------
def check_overload(base_url: str, model: str, admitted: int, factor: int = 10, max_tokens: int = 32) -> dict:
    """`factor` x `admitted` concurrent requests (admitted = running slots + --max-waiting): the
    excess gets 429/503 with an error object, the admitted ones finish whole, and the server
    serves normally afterwards."""
    body = {"model": model, "prompt": "Overload", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    total = admitted * factor

    async def main():
        limits = httpx.Limits(max_connections=total + 4)
        async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
            async def one():
                start = time.perf_counter()
                resp = await client.post("/v1/completions", json=body)
                return resp, time.perf_counter() - start

            return await asyncio.gather(*(one() for _ in range(total)))

    results = asyncio.run(main())
    ok = [r for r, _ in results if r.status_code == 200]
    rejected = [(r, s) for r, s in results if r.status_code in (429, 503)]
    other = [r.status_code for r, _ in results if r.status_code not in (200, 429, 503)]
    assert not other, f"unexpected statuses under overload: {other}"
    assert rejected, "nothing was rejected: is --max-waiting set?"
    assert ok, "nothing was admitted"
    for r, _ in rejected:
        assert_error_object(r, "overload rejection")
    for r in ok:
        assert r.json()["usage"]["completion_tokens"] == max_tokens
    assert_recovered(base_url)
    with httpx.Client(base_url=base_url, timeout=120) as client:  # recovered: a normal request works
        after = client.post("/v1/completions", json=body)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == max_tokens
    return {"sent": total, "ok": len(ok), "rejected": len(rejected),
            "rejection_latency_ms_max": max(s for _, s in rejected) * 1e3,
            "rejection_latency_ms_median": statistics.median(s for _, s in rejected) * 1e3}


# ---- soak ------------------------------------------------------------------------------------
def check_soak(base_url: str, model: str, duration_s: float = 60.0, concurrency: int = 8, max_tokens: int = 32,
               max_rss_growth: float = 0.2, sample_every_s: float = 1.0) -> dict:
    """Steady streaming load for `duration_s`: resident memory of the last third of the run stays
    within `max_rss_growth` of the first third, requests keep succeeding, the KV gauge returns to 0."""
    body = {"model": model, "prompt": "Soak test", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    samples: list[tuple[float, float | None, float | None]] = []
    counts = {"ok": 0, "failed": 0}

    async def main() -> None:
        end = time.monotonic() + duration_s
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            async def worker() -> None:
                while time.monotonic() < end:
                    try:
                        async with client.stream("POST", "/v1/completions", json=body) as resp:
                            async for _ in resp.aiter_lines():
                                pass
                            counts["ok" if resp.status_code == 200 else "failed"] += 1
                    except httpx.HTTPError:
                        counts["failed"] += 1

            async def sampler() -> None:
                while time.monotonic() < end:
                    rss = await asyncio.to_thread(metric_value, base_url, RSS_METRIC)
                    kv = await asyncio.to_thread(metric_value, base_url, KV_GAUGES)
                    samples.append((time.monotonic(), rss, kv))
                    await asyncio.sleep(sample_every_s)

            await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))

    asyncio.run(main())
    assert counts["failed"] == 0, f"{counts['failed']} requests failed during the soak"
    assert counts["ok"] > 0, "no request finished during the soak"
    rss = [s[1] for s in samples if s[1] is not None]
    report = {"requests": counts["ok"], "samples": len(samples), "rss_mb_first": None, "rss_mb_last": None}
    if len(rss) >= 3:
        third = max(1, len(rss) // 3)
        first, last = statistics.median(rss[:third]), statistics.median(rss[-third:])
        report.update(rss_mb_first=first / 2**20, rss_mb_last=last / 2**20)
        assert last <= first * (1 + max_rss_growth), f"resident memory grew from {first / 2**20:.0f} to {last / 2**20:.0f} MiB"
    assert_recovered(base_url)
    return report


# ---- CLI -------------------------------------------------------------------------------------
CHECKS = ("bad", "fuzz", "disconnect", "overload", "soak")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.robustness", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of {', '.join(CHECKS)}")
    p.add_argument("--max-model-len", type=int, default=None, help="default: what /v1/models says")
    p.add_argument("--fuzz-examples", type=int, default=200)
    p.add_argument("--disconnects", type=int, default=300)
    p.add_argument("--disconnect-concurrency", type=int, default=32, help="streams open at once (keep under --max-waiting)")
    p.add_argument("--max-waiting", type=int, default=None, help="the server's --max-waiting (overload check)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="the server's running slots (overload check)")
    p.add_argument("--soak-seconds", type=float, default=120.0)
    p.add_argument("--soak-concurrency", type=int, default=16)
    args = p.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    max_len = args.max_model_len
    if max_len is None:
        card = httpx.get(args.base_url.rstrip("/") + "/v1/models", timeout=10).json()["data"][0]
        max_len = int(card.get("max_model_len") or 2048)
    for check in checks:
        start = time.monotonic()
        if check == "bad":
            result = check_bad_inputs(args.base_url, args.model, max_len)
        elif check == "fuzz":
            result = check_fuzz(args.base_url, args.model, args.fuzz_examples)
        elif check == "disconnect":
            result = check_disconnects(args.base_url, args.model, args.disconnects, concurrency=args.disconnect_concurrency)
        elif check == "overload":
            if args.max_waiting is None or args.max_num_seqs is None:
                raise SystemExit("overload needs --max-waiting and --max-num-seqs (the server's)")
            result = check_overload(args.base_url, args.model, args.max_waiting + args.max_num_seqs)
        elif check == "soak":
            result = check_soak(args.base_url, args.model, args.soak_seconds, args.soak_concurrency)
        else:
            raise SystemExit(f"unknown check {check!r}; choose from {', '.join(CHECKS)}")
        print(f"{check}: passed in {time.monotonic() - start:.1f} s: {result}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
