"""Streaming OpenAI requests over HTTP, timed per chunk. Talks to any OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import aiohttp

from load_tests.workload import RequestSpec

# The parts of roseinfer's per-request timing (server/app.py request_timing), in ms.
TIMING_PARTS = ("queue", "prefill", "decode", "ttft", "e2e")


@dataclass
class RequestRecord:
    """What one request did, as the client saw it (times in seconds from the run's start)."""

    index: int
    send_s: float
    status: int = 0  # HTTP status; 0 when the connection itself failed
    error: str | None = None
    first_token_s: float | None = None
    end_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    # Arrival time of every chunk that carried text; a chunk may carry several tokens.
    chunk_times_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    # Where the server says the time went (roseinfer's "timing" in the last chunk): queue,
    # prefill, decode, ttft, e2e in ms on the server's clock. None from other servers.
    server_timing_ms: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.end_s is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.send_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.send_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.end_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    def to_json(self) -> dict:
        return asdict(self) | {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}


def request_body(spec: RequestSpec, model: str, endpoint: str, temperature: float, timing: bool = True) -> dict:
    """The streamed request; `timing` asks the server for its per-request timing (a roseinfer
    extension inside stream_options, which OpenAI-compatible servers ignore or refuse: --no-timing)."""
    stream_options = {"include_usage": True, **({"include_timing": True} if timing else {})}
    body: dict = {"model": model, "max_tokens": spec.max_tokens, "temperature": temperature, "stream": True,
                  "stream_options": stream_options}
    if spec.ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension; exact output lengths for random prompts
    if endpoint == "chat":
        body["messages"] = spec.messages if spec.messages is not None else [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body | spec.extra


ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


async def stream_request(session: aiohttp.ClientSession, base_url: str, body: dict, endpoint: str, record: RequestRecord,
                         t0: float, headers: dict | None = None) -> RequestRecord:
    """POST `body` with stream=true and fill `record` from the SSE chunks as they arrive.

    aiohttp, not httpx: at hundreds of concurrent streams httpx's pure-Python HTTP parsing made
    the client, not the server, the bottleneck of a load test."""
    url = base_url.rstrip("/") + ENDPOINT_PATHS[endpoint]
    text_key = "delta" if endpoint == "chat" else "text"
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            record.status = resp.status
            if resp.status != 200:
                record.error = _error_message(await resp.read())
                return record
            pending = b""
            done = False
            async for data in resp.content.iter_any():
                now = time.perf_counter() - t0  # events that arrived in one read share its time
                events = (pending + data).replace(b"\r\n", b"\n").split(b"\n\n")
                pending = events.pop()
                for event in events:
                    if _read_event(event, record, text_key, now):
                        done = True
                if done:
                    break
            record.end_s = time.perf_counter() - t0
            if record.output_tokens == 0:  # a server without usage in streams: count chunks
                record.output_tokens = len(record.chunk_times_s)
            if record.first_token_s is None and record.output_tokens:
                record.first_token_s = record.end_s
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


def _read_event(event: bytes, record: RequestRecord, text_key: str, now: float) -> bool:
    """Apply one SSE event to `record`; True at `[DONE]`."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        chunk = json.loads(data)
        if chunk.get("timing"):
            record.server_timing_ms = chunk["timing"]
        if chunk.get("usage"):
            record.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
            record.output_tokens = chunk["usage"].get("completion_tokens", 0)
        for choice in chunk.get("choices", []):
            piece = choice.get(text_key)
            if isinstance(piece, dict):
                piece = piece.get("content")
            if piece:
                if record.first_token_s is None:
                    record.first_token_s = now
                record.chunk_times_s.append(now)
            if choice.get("finish_reason"):
                record.finish_reason = choice["finish_reason"]
    return False


def _error_message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace")
