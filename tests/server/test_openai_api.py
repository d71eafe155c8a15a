"""The HTTP API against a real server: formats, streaming frames, errors, disconnects, metrics, auth."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import openai
import pytest

from engine import SamplingParams
from tests.server.conftest import ServerProcess, gauge, wait_for_gauge

MODEL = "tiny"


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=60, **kw)


def sse_events(raw: str) -> list[str]:
    """Split an SSE body, checking OpenAI's exact framing: `data: ...` events separated by blank lines."""
    assert raw.endswith("data: [DONE]\n\n")
    frames = raw.split("\n\n")
    assert frames[-1] == ""
    events = []
    for frame in frames[:-1]:
        assert frame.startswith("data: ") and "\n" not in frame, frame
        events.append(frame[len("data: "):])
    return events


def test_models_health_version(server):
    models = httpx.get(server.base_url + "/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == 256
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    assert "version" in httpx.get(server.base_url + "/version").json()


def test_greedy_completion_equals_offline_generate(server, tiny_llm):
    prompt = "The history of the printing press"
    expected = tiny_llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["text"] == expected.text and choice["finish_reason"] == "length" and choice["index"] == 0
    n_prompt = len(post(server, "/tokenize", {"prompt": prompt}).json()["tokens"])
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 20, "total_tokens": n_prompt + 20}


def test_streaming_completion_frames_and_usage(server):
    body = {"model": MODEL, "prompt": "Streaming test", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = post(server, "/v1/completions", body).json()
    r = post(server, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    text_chunks = chunks[:-1]
    assert all(c["id"] == text_chunks[0]["id"] and c["object"] == "text_completion" and c["usage"] is None for c in text_chunks)
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == full["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])


def test_list_prompts_token_prompts_and_n(server):
    req = {"model": MODEL, "prompt": ["a b c", "Hello world"], "n": 2, "max_tokens": 4, "temperature": 1.0,
           "seed": 5, "ignore_eos": True}
    body = post(server, "/v1/completions", req).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    again = post(server, "/v1/completions", req).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in body["choices"]]  # seeds reproduce
    assert body["usage"]["completion_tokens"] == 16
    assert body["usage"]["prompt_tokens"] == 3 + 2  # each prompt counted once, not once per choice
    by_ids = post(server, "/v1/completions", {**req, "prompt": [[64, 275, 269], [15496, 995]]}).json()
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in body["choices"]]
    single_ids = post(server, "/v1/completions", {**req, "prompt": [15496, 995], "n": 1}).json()
    assert single_ids["choices"][0]["text"] == body["choices"][2]["text"]


def test_echo_and_stop(server):
    base = {"model": MODEL, "prompt": "Echo me", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    text = post(server, "/v1/completions", base).json()["choices"][0]["text"]
    echoed = post(server, "/v1/completions", {**base, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "Echo me" + text
    stop = text[6:9]
    cut = post(server, "/v1/completions", {**base, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]


def test_completion_logprobs_shape(server):
    body = post(server, "/v1/completions", {"model": MODEL, "prompt": "x y", "max_tokens": 3, "logprobs": 2, "temperature": 0}).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 3
    assert all(len(t) <= 2 for t in lp["top_logprobs"]) and all(x <= 0 for x in lp["token_logprobs"])


def test_openai_sdk_completions_and_chat(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens >= 1
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2,
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                           max_tokens=6, temperature=0)
    assert streamed == plain.choices[0].message.content


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
        ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt"),
        ({"model": MODEL, "prompt": []}, 400, "prompt"),
        ({"model": MODEL, "prompt": 12}, 400, "prompt"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "stop": 5}, 400, "stop"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ({"prompt": "x"}, 200, None),
    ],
)
def test_bad_input_gets_openai_errors(server, body, status, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    if status != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == param and "Traceback" not in err["message"]


def test_context_length_and_malformed_json(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "word " * 300})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 256})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(server.base_url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400


def test_streaming_disconnect_frees_kv_blocks(server):
    name = "roseinfer_kv_cache_usage_perc"
    aborted_before = _counter(server, 'roseinfer_request_success_total{finished_reason="abort"}')
    for _ in range(3):
        with httpx.stream("POST", server.base_url + "/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "never ending", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen == 3:
                    break  # leave mid-stream
    assert wait_for_gauge(server.base_url, name, 0.0) == 0.0
    assert wait_for_gauge(server.base_url, "roseinfer_num_requests_running", 0.0) == 0.0
    assert _counter(server, 'roseinfer_request_success_total{finished_reason="abort"}') >= aborted_before + 3


def test_non_streaming_disconnect_frees_kv_blocks(server):
    body = json.dumps({"model": MODEL, "prompt": "long one", "max_tokens": 200, "ignore_eos": True}).encode()
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        assert wait_for_gauge(server.base_url, "roseinfer_num_requests_running", 1.0) == 1.0
    assert wait_for_gauge(server.base_url, "roseinfer_kv_cache_usage_perc", 0.0) == 0.0
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "still fine", "max_tokens": 2}).status_code == 200


def _counter(server, sample: str) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    return 0.0


def test_metrics_move_and_summary(server):
    before = gauge(server.base_url, "roseinfer_generation_tokens_total")
    post(server, "/v1/completions", {"model": MODEL, "prompt": "count me", "max_tokens": 5, "ignore_eos": True})
    assert gauge(server.base_url, "roseinfer_generation_tokens_total") == before + 5
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("roseinfer_time_to_first_token_seconds_bucket", "roseinfer_time_per_output_token_seconds_count",
                 "roseinfer_inter_token_latency_seconds_sum", "roseinfer_e2e_request_latency_seconds_count",
                 "roseinfer_request_queue_time_seconds_count", "roseinfer_prefix_cache_hits_total",
                 "roseinfer_num_requests_waiting", "roseinfer_num_preemptions_total"):
        assert name in text, name
    summary = httpx.get(server.base_url + "/metrics/summary").json()
    assert summary["ttft_s"]["count"] >= 1 and summary["ttft_s"]["p50"] <= summary["ttft_s"]["p99"]


def test_tokenize_detokenize_roundtrip(server):
    toks = post(server, "/tokenize", {"prompt": "Hello world"}).json()
    assert toks["tokens"] == [15496, 995] and toks["count"] == 2
    assert post(server, "/detokenize", {"tokens": toks["tokens"]}).json() == {"prompt": "Hello world"}


def test_api_key_and_max_waiting(tiny_llama_dir):
    srv = ServerProcess(tiny_llama_dir, "--api-key", "sekrit", "--max-waiting", "0", "--max-request-bytes", "2000")
    try:
        assert httpx.get(srv.base_url + "/health").status_code == 200
        r = httpx.get(srv.base_url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.get(srv.base_url + "/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        big = httpx.post(srv.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x" * 3000},
                         headers={"Authorization": "Bearer sekrit"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        assert srv.stop() == 0


def test_openapi_documents_the_generation_bodies(server):
    """The generation routes parse their bodies themselves; /openapi.json must still describe them."""
    schema = httpx.get(server.base_url + "/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, model, field in (("/v1/completions", "CompletionRequest", "prompt"),
                               ("/v1/chat/completions", "ChatCompletionRequest", "messages")):
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}" and field in components[model]["properties"]
    dangling = set(re.findall(r"#/components/schemas/(\w+)", json.dumps(schema))) - set(components)
    assert not dangling
    # A wrong type deep in the body is reported with its path, as FastAPI's own validation did.
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_api_processes_stop_with_their_supervisor(tiny_llama_dir):
    """--api-server-count: a SIGTERM as soon as the first API process answers (the others may
    still be starting) drains to exit 0; a supervisor killed outright takes its API processes
    (and so the engine process) down with it instead of leaving them serving."""
    early = ServerProcess(tiny_llama_dir, "--api-server-count", "3")
    assert early.stop() == 0
    orphaned = ServerProcess(tiny_llama_dir, "--api-server-count", "2")
    assert post(orphaned, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200
    orphaned.proc.kill()
    orphaned.proc.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(orphaned.base_url + "/health", timeout=1.0)
        except httpx.HTTPError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the API processes kept serving after their supervisor was killed")


def test_server_timing_header_and_streamed_timing_add_up(server):
    """Non-streamed: a W3C Server-Timing header; streamed with stream_options.include_timing: a
    "timing" object in the final chunk. queue + prefill + decode = e2e, ttft = queue + prefill."""
    def parse(header: str) -> dict[str, float]:
        return {name.strip(): float(dur.split("=")[1]) for name, dur in (part.split(";") for part in header.split(","))}

    r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "n": 2})
    timings = [parse(r.headers["server-timing"])]
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    timings.append(parse(r.headers["server-timing"]))
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "Hello", "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True, "include_timing": True}}) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all("timing" not in c for c in chunks[:-1])
    timings.append(chunks[-1]["timing"])
    for t in timings:
        assert set(t) == {"queue", "prefill", "decode", "ttft", "e2e"} and all(v >= 0 for v in t.values())
        assert abs(t["queue"] + t["prefill"] + t["decode"] - t["e2e"]) < 1.0
        assert abs(t["queue"] + t["prefill"] - t["ttft"]) < 1.0 and t["decode"] > 0
    plain = httpx.post(server.base_url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "Hello", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}})
    assert '"timing"' not in plain.text  # off unless asked for
