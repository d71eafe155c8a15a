"""Structured outputs and tool calling through the official `openai` SDK against a live CPU server
running the real SmolLM2 weights (the engine in its own process, the API process validating)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from tests.server.conftest import ServerProcess

MODEL = "smol"
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"enum": ["chess", "tennis", "music"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 24},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                        "parameters": {"type": "object", "properties": {
                                            "a": {"type": "integer", "minimum": -99, "maximum": 99},
                                            "b": {"type": "integer", "minimum": -99, "maximum": 99}},
                                            "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    srv = ServerProcess("smollm2-135m-instruct", "--served-model-name", MODEL, "--kv-cache-memory", "0.25",
                        "--max-model-len", "2048", "--max-num-seqs", "16")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(smol):
    return OpenAI(base_url=smol.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_json_schema_response_format_validates(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=120, n=3,
        temperature=1.0, seed=11,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert len(reply.choices) == 3
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_sdk_parse_with_a_pydantic_model(client):
    class City(BaseModel):
        name: str = Field(max_length=30)
        country: str = Field(max_length=30)
        population_millions: int = Field(ge=0, le=100)
        kind: Literal["capital", "town"]

    reply = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Tell me about Paris."}],
                                          response_format=City, max_tokens=150, temperature=0)
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.kind in ("capital", "town")


def test_json_object_and_vllm_guided_fields(client, smol):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object."}],
                                           max_tokens=100, temperature=0, response_format={"type": "json_object"})
    assert reply.choices[0].message.content.startswith("{")
    choice = httpx.post(smol.base_url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "Is the sky blue? Answer:", "max_tokens": 5, "guided_choice": ["yes", "no"]}).json()
    assert choice["choices"][0]["text"] in ("yes", "no")
    regex = httpx.post(smol.base_url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "A date:", "max_tokens": 20, "structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]"}}).json()
    text = regex["choices"][0]["text"]
    assert len(text) == 7 and text[:2] == "20" and text[4] == "-"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_enforced_tool_choice_gives_tool_calls(client, choice):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice=choice,
                                           max_tokens=150, temperature=0, parallel_tool_calls=False)
    out = reply.choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    (call,) = out.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    schema = {"get_weather": WEATHER, "add": ADD}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_streamed_tool_call_deltas(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                            max_tokens=150, temperature=0, stream=True, parallel_tool_calls=False)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": "", "headers": 0})
            if tc.id is not None:
                call["headers"] += 1
                call["id"], call["name"] = tc.id, tc.function.name
                assert tc.type == "function"
            call["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    call = calls[0]
    assert call["headers"] == 1 and call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_tool_result_round_trip(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=150, temperature=0, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=40, temperature=0)
    out = second.choices[0]
    assert out.finish_reason in ("stop", "length", "tool_calls")
    assert out.message.content or out.message.tool_calls


def test_auto_tool_choice_returns_content_or_calls(client):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=80, temperature=0)
    message = reply.choices[0].message
    if message.tool_calls:
        assert reply.choices[0].finish_reason == "tool_calls"
        json.loads(message.tool_calls[0].function.arguments)
    else:
        assert message.content


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_invalid_constraints_are_openai_400s(smol, body, param):
    r = httpx.post(smol.base_url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_constrained_and_free_requests_share_the_server(client):
    def constrained(seed: int):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "A person as JSON."}], max_tokens=120, temperature=0.8,
            seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
        return json.loads(reply.choices[0].message.content)

    def free(seed: int):
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, seed=seed,
                                         temperature=0.8).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        people = [pool.submit(constrained, s) for s in range(4)]
        texts = [pool.submit(free, s) for s in range(4)]
        for person in people:
            jsonschema.validate(person.result(), PERSON)
        assert all(isinstance(t.result(), str) for t in texts)
