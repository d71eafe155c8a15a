"""Where a request's time went, for clients: the W3C Server-Timing header of a non-streamed
response and the "timing" object that ends a stream sent with stream_options.include_timing."""

from __future__ import annotations

from engine.llm_engine import RequestOutput


def request_timing(out: RequestOutput) -> dict[str, float] | None:
    """Where a finished request's time went, in ms, on the engine's clock from the moment it was
    queued: waiting for a batch, its prefill (to the first token), its decode (first token to the
    last). queue + prefill + decode = e2e; ttft = queue + prefill. None if it never ran."""
    if None in (out.first_scheduled_time_s, out.first_token_time_s, out.finished_time_s):
        return None
    ms = {"queue": out.first_scheduled_time_s - out.arrival_time_s,
          "prefill": out.first_token_time_s - out.first_scheduled_time_s,
          "decode": out.finished_time_s - out.first_token_time_s,
          "ttft": out.first_token_time_s - out.arrival_time_s,
          "e2e": out.finished_time_s - out.arrival_time_s}
    return {name: round(seconds * 1e3, 3) for name, seconds in ms.items()}


def slowest_timing(timings: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Of several choices' timings, the one that finished last: the one the response waited for."""
    timed = [t for t in timings if t is not None]
    return max(timed, key=lambda t: t["e2e"]) if timed else None


def server_timing_header(timing: dict[str, float] | None) -> dict[str, str]:
    """A W3C Server-Timing header (browsers' dev tools and proxies show it), or none."""
    if timing is None:
        return {}
    return {"Server-Timing": ", ".join(f"{name};dur={ms}" for name, ms in timing.items())}
