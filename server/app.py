"""The FastAPI app: OpenAI-compatible routes over one AsyncEngine in this process."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from engine import tool_calls
from engine.async_engine import AsyncEngine, RequestStream
from engine.errors import EngineError, InvalidRequest, UnknownModel
from engine.llm_engine import RequestOutput, TokenLogprob
from engine.loader import SMOLLM2_NAMES
from engine.sampling_params import StructuredOutputSpec
from engine.structured_output import StructuredOutputs
from server.errors import (engine_error_response, error_response, http_error_response, internal_error_response,
                           validation_error_response)
from server.metrics import ServerMetrics
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.timing import request_timing, server_timing_header, slowest_timing

VERSION = "0.1.0"
# A schema or grammar that takes longer than this to compile is refused (400), not waited on.
COMPILE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_request_bytes: int = 8 * 1024**2
    model_aliases: tuple[str, ...] = field(default=())
    # Set when several API processes serve one engine: where their metrics are shared.
    metrics_multiprocess_dir: str | None = None


@dataclass
class _Choice:
    """Accumulated state of one choice (one engine request)."""

    index: int
    prompt_index: int
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    timing: dict[str, float] | None = None  # where its time went (request_timing), once finished


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


async def _parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """The generation routes' body, parsed and validated in one pass by pydantic's JSON parser.
    A `body: Model` parameter sends every request through FastAPI's dependency solving and
    body-to-arguments machinery: skipping it took about 12% off the API process's CPU per request
    in a 512-request burst (docs/BENCHMARKS.md); the parse itself is about 22 us either way.
    Errors take the same path as FastAPI's own."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _documented_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that parses its body itself: the schema it would have had."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _with_body_schemas(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Register `models` (and what they reference) in the OpenAPI components `_documented_body` points to."""
    default_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = default_openapi()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
        return app.openapi_schema

    app.openapi = openapi


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _AuthAndSizeGuard:
    """API key on /v1/* and the body-size cap, as plain ASGI: a `@app.middleware("http")` function
    (Starlette's BaseHTTPMiddleware) re-pipes every streamed chunk through extra tasks and memory
    streams, which py-spy showed as the server's largest per-chunk cost."""

    def __init__(self, app, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.expected_auth = None if settings.api_key is None else f"Bearer {settings.api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if self.expected_auth is not None and scope["path"].startswith("/v1/") \
                    and headers.get(b"authorization") != self.expected_auth:
                response = error_response(401, "invalid or missing API key", "invalid_request_error", None, "invalid_api_key")
                return await response(scope, receive, send)
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > self.settings.max_request_bytes:
                response = error_response(413, f"request body over {self.settings.max_request_bytes} bytes",
                                          "invalid_request_error", None, "request_too_large")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    app = FastAPI(title="roseinfer", version=VERSION)
    metrics = ServerMetrics(engine, settings.metrics_multiprocess_dir)
    tokenizer = engine.tokenizer
    max_model_len = engine.engine.max_model_len
    created = int(time.time())
    accepted_names = {settings.served_model_name, engine.engine.model_name, *settings.model_aliases}

    app.state.engine = engine
    app.state.metrics = metrics
    # Grammars are compiled here first, off the event loop, so a bad one is a 400 before anything
    # is queued; an in-process engine shares its compiler (and cache) with us.
    structured = getattr(engine.engine, "structured", None) or StructuredOutputs.for_tokenizer(
        tokenizer, engine.engine.model_config.vocab_size, engine.engine.model_config.eos_token_ids)
    structured.prepare()

    async def validate(spec: StructuredOutputSpec | None) -> None:
        if spec is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(structured.validate, spec), COMPILE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise InvalidRequest(f"the {spec.kind.replace('_', ' ')} did not compile within {COMPILE_TIMEOUT_S:.0f} s",
                                 param="response_format") from None

    # ---- errors: one mapping for everything -------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return validation_error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException):
        return http_error_response(exc)

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError):
        return engine_error_response(exc)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        return internal_error_response(exc)

    app.add_middleware(_AuthAndSizeGuard, settings=settings)

    def check_model(name: str | None) -> str:
        if name is not None and name not in accepted_names:
            raise UnknownModel(f"the model {name!r} does not exist; this server serves {settings.served_model_name!r}")
        return settings.served_model_name

    # ---- plain routes ----------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return error_response(503, "engine is dead", "server_error", None, "engine_dead")
        cores = getattr(engine.engine, "health", None)  # data parallel: which engine cores are up
        if cores is None:
            return {"status": "ok"}
        detail = cores()
        return {"status": "degraded" if detail["dead_cores"] else "ok", **detail}

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.get("/v1/models")
    async def models():
        card = {"id": settings.served_model_name, "object": "model", "created": created, "owned_by": "roseinfer",
                "root": engine.engine.model_name, "parent": None, "max_model_len": max_model_len}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics/summary")
    async def metrics_summary():
        return metrics.summary()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if body.messages is not None:
            text = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
            ids = tokenizer.encode(text, add_special_tokens=False)
        elif body.prompt is not None:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise InvalidRequest("give prompt or messages", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        if any(not 0 <= t < tokenizer.vocab_size for t in body.tokens):
            raise InvalidRequest("token id out of range", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    # ---- generation ------------------------------------------------------------------
    def start_choices(prompts, make_params, n: int, prefix: str):
        """Queue every choice at once (so they batch); errors raise before anything is sent."""
        choices: list[_Choice] = []
        streams: list[RequestStream] = []
        base = f"{prefix}-{uuid.uuid4().hex}"
        try:
            for pi, prompt in enumerate(prompts):
                for j in range(n):
                    stream = engine.add_request(f"{base}-{pi}-{j}", prompt, make_params(j))
                    streams.append(stream)
                    choices.append(_Choice(index=len(choices), prompt_index=pi, request_id=stream.request_id))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        merged = _single(choices[0], streams[0]) if len(streams) == 1 else _merge(choices, streams)
        return base, choices, merged

    def note(choice: _Choice, out: RequestOutput) -> None:
        """What a choice keeps of each output as it passes: its prompt's length, its final timing."""
        choice.num_prompt_tokens = out.num_prompt_tokens or choice.num_prompt_tokens
        if out.finished:
            choice.timing = request_timing(out)

    async def _single(choice: _Choice, stream: RequestStream) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
        """The common n=1 case without _merge's pump task and second queue (a hot path at high
        concurrency); closing early aborts the request."""
        try:
            async for out in stream:
                note(choice, out)
                yield choice, out
        finally:
            stream.close()

    async def _merge(choices: list[_Choice], streams: list[RequestStream]) -> AsyncIterator[tuple[_Choice, RequestOutput]]:
        """Outputs of all choices in arrival order; closing early aborts every unfinished choice."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: _Choice, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    note(choice, out)
                    queue.put_nowait((choice, out))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((choice, exc))

        tasks = [asyncio.create_task(pump(c, s)) for c, s in zip(choices, streams)]
        remaining = len(streams)
        try:
            while remaining:
                choice, out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    remaining -= 1
                yield choice, out
        finally:
            for t in tasks:
                t.cancel()
            for stream in streams:
                stream.close()

    async def with_disconnect_guard(request: Request, coro):
        """Run `coro`, cancelling it (which aborts its requests) if the client goes away."""
        work = asyncio.ensure_future(coro)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not work.done():
            work.cancel()
            try:
                await work
            except asyncio.CancelledError:
                pass
            return Response(status_code=499)
        return work.result()

    def usage(choices: list[_Choice]) -> dict:
        prompt = sum({c.prompt_index: c.num_prompt_tokens for c in choices}.values())
        completion = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def closing_chunk(rid: str, obj: str, now: int, model: str, choices: list[_Choice], include_usage: bool,
                      include_timing: bool) -> str:
        """The stream's last chunk, with no choices: usage (stream_options.include_usage) and where
        the time went (include_timing, roseinfer's extension)."""
        final = {"id": rid, "object": obj, "created": now, "model": model, "choices": [],
                 "usage": usage(choices) if include_usage else None}
        if include_timing:
            final["timing"] = slowest_timing([c.timing for c in choices])
        return _sse(final)

    def completion_logprobs(entries: list[TokenLogprob], text_offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for e in entries:
            piece = tokenizer.decode([e.token_id], skip_special_tokens=False)
            tokens.append(piece)
            token_lps.append(e.logprob)
            tops.append({tokenizer.decode([t], skip_special_tokens=False): lp for t, lp in e.top})
            offsets.append(text_offset)
            text_offset += len(piece)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(entries: list[TokenLogprob]) -> dict:
        def item(token_id: int, lp: float) -> dict:
            piece = tokenizer.decode([token_id], skip_special_tokens=False)
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}

    @app.post("/v1/completions", openapi_extra=_documented_body(CompletionRequest))
    async def completions(request: Request):
        body: CompletionRequest = await _parse_body(request, CompletionRequest)
        model = check_model(body.model)
        prompts = body.prompts()
        if body.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        body.check_common()
        spec = body.structured_output_spec()
        params = lambda j: body.to_sampling_params(body.max_tokens, body.logprobs, j, spec)  # noqa: E731
        params(0)  # validate before starting anything
        await validate(spec)
        rid, choices, stream = start_choices(prompts, params, body.n, "cmpl")
        now = int(time.time())
        echo_text = {i: (p if isinstance(p, str) else tokenizer.decode(p)) for i, p in enumerate(prompts)} if body.echo else {}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            include_timing = bool(body.stream_options and body.stream_options.include_timing)

            async def sse() -> AsyncIterator[str]:
                sent_echo: set[int] = set()
                async for choice, out in stream:
                    text = out.new_text
                    if choice.index not in sent_echo and body.echo:
                        text = echo_text[choice.prompt_index] + text
                    sent_echo.add(choice.index)
                    choice.token_ids.extend(out.new_token_ids)
                    if not text and not out.finished and not out.new_logprobs:
                        continue
                    lp = None
                    if body.logprobs is not None and out.new_logprobs is not None:
                        lp = completion_logprobs(out.new_logprobs, len(choice.text))
                    choice.text += text
                    chunk = {"id": rid, "object": "text_completion", "created": now, "model": model,
                             "choices": [{"index": choice.index, "text": text, "logprobs": lp,
                                          "finish_reason": out.finish_reason if out.finished else None}]}
                    if include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
                if include_usage or include_timing:
                    yield closing_chunk(rid, "text_completion", now, model, choices, include_usage, include_timing)
                yield _sse("[DONE]")

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        async def collect():
            async for choice, out in stream:
                choice.text += out.new_text
                choice.token_ids.extend(out.new_token_ids)
                if out.new_logprobs:
                    choice.logprobs.extend(out.new_logprobs)
                if out.finished:
                    choice.finish_reason = out.finish_reason
            result = []
            for c in choices:
                prefix_text = echo_text.get(c.prompt_index, "")
                lp = completion_logprobs(c.logprobs, len(prefix_text)) if body.logprobs is not None else None
                result.append({"index": c.index, "text": prefix_text + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
            return JSONResponse({"id": rid, "object": "text_completion", "created": now, "model": model,
                                 "choices": result, "usage": usage(choices)},
                                headers=server_timing_header(slowest_timing([c.timing for c in choices])))

        return await with_disconnect_guard(request, collect())

    @app.post("/v1/chat/completions", openapi_extra=_documented_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await _parse_body(request, ChatCompletionRequest)
        model = check_model(body.model)
        body.check_common()
        k = body.logprobs_k()
        tool_mode, named_tool = body.tool_mode()
        tools = body.tool_dicts()
        spec = body.structured_output_spec()
        takes_tools = tokenizer.chat_template_takes_tools
        prompt = tokenizer.apply_chat_template(body.template_messages(takes_tools),
                                               add_generation_prompt=body.add_generation_prompt,
                                               tools=tools if takes_tools and tool_mode != "none" else None)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        params = lambda j: body.to_sampling_params(body.max_new_tokens(), k, j, spec)  # noqa: E731
        params(0)
        await validate(spec)
        rid, choices, stream = start_choices([prompt_ids], params, body.n, "chatcmpl")
        now = int(time.time())

        def finish_reason(reason: str | None, num_calls: int) -> str | None:
            return "tool_calls" if num_calls and reason == "stop" else reason

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            include_timing = bool(body.stream_options and body.stream_options.include_timing)
            # Per choice: turns text into content and tool-call deltas (engine/tool_calls.py).
            calls = {c.index: tool_calls.ToolCallStream(tool_mode, tools, named_tool) for c in choices} \
                if tool_mode != "none" else {}

            def chunk(choice_delta: dict) -> str:
                c = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model, "choices": [choice_delta]}
                if include_usage:
                    c["usage"] = None
                return _sse(c)

            async def sse() -> AsyncIterator[str]:
                for c in choices:  # the first chunk of each choice carries the role
                    yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
                async for choice, out in stream:
                    choice.token_ids.extend(out.new_token_ids)
                    lp = chat_logprobs(out.new_logprobs) if (k is not None and out.new_logprobs) else None
                    parser = calls.get(choice.index)
                    if parser is None:
                        deltas = [{"content": out.new_text}] if out.new_text else []
                    else:
                        deltas = parser.feed(out.new_text) + (parser.finish() if out.finished else [])
                    if lp is not None and not deltas:
                        deltas = [{"content": ""}]
                    for i, delta in enumerate(deltas):
                        yield chunk({"index": choice.index, "delta": delta, "logprobs": lp if i == 0 else None,
                                     "finish_reason": None})
                    if out.finished:
                        reason = finish_reason(out.finish_reason, parser.num_calls if parser is not None else 0)
                        yield chunk({"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": reason})
                if include_usage or include_timing:
                    yield closing_chunk(rid, "chat.completion.chunk", now, model, choices, include_usage, include_timing)
                yield _sse("[DONE]")

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        def message(c: _Choice) -> tuple[dict, str | None]:
            if tool_mode == "none":
                return {"role": "assistant", "content": c.text}, c.finish_reason
            content, parsed = tool_calls.parse(c.text, tool_mode, tools, named_tool)
            msg: dict = {"role": "assistant", "content": content}
            if parsed:
                msg["tool_calls"] = [call.as_openai() for call in parsed]
            return msg, finish_reason(c.finish_reason, len(parsed))

        async def collect():
            async for choice, out in stream:
                choice.text += out.new_text
                choice.token_ids.extend(out.new_token_ids)
                if out.new_logprobs:
                    choice.logprobs.extend(out.new_logprobs)
                if out.finished:
                    choice.finish_reason = out.finish_reason
            result = []
            for c in choices:
                msg, reason = message(c)
                result.append({"index": c.index, "message": msg,
                               "logprobs": chat_logprobs(c.logprobs) if k is not None else None, "finish_reason": reason})
            return JSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": model,
                                 "choices": result, "usage": usage(choices)},
                                headers=server_timing_header(slowest_timing([c.timing for c in choices])))

        return await with_disconnect_guard(request, collect())

    _with_body_schemas(app, (CompletionRequest, ChatCompletionRequest))
    return app


def default_aliases(model: str) -> tuple[str, ...]:
    return SMOLLM2_NAMES if model in SMOLLM2_NAMES else ()


__all__ = ["build_app", "ServerSettings", "default_aliases", "PlainTextResponse", "JSONResponse"]
