"""The one place that turns engine and validation errors into OpenAI error responses."""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.errors import ContextLengthExceeded, EngineDead, EngineError, EngineOverloaded, InvalidRequest, UnknownModel

logger = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | int | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def engine_error_response(exc: EngineError) -> JSONResponse:
    """Status codes: 400 bad request (incl. context length), 404 unknown model, 429 overloaded, 503 dead."""
    if isinstance(exc, ContextLengthExceeded):
        return error_response(400, exc.message, "invalid_request_error", exc.param, "context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return error_response(400, exc.message, "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, UnknownModel):
        return error_response(404, exc.message, "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, EngineOverloaded):
        return error_response(429, exc.message, "rate_limit_error", None, exc.code)
    if isinstance(exc, EngineDead):
        return error_response(503, exc.message, "server_error", None, exc.code)
    return error_response(500, exc.message, "server_error", None, exc.code)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, "request body is not valid JSON", "invalid_request_error", None, "invalid_json")
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    message = f"{where}: {first.get('msg', 'invalid value')}"
    return error_response(400, message, "invalid_request_error", param, "invalid_value")


def internal_error_response(exc: Exception) -> JSONResponse:
    logger.exception("internal error", exc_info=exc)
    return error_response(500, "internal server error", "server_error", None, "internal_error")


def http_error_response(exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (unparseable body, unknown route, wrong method) as OpenAI error objects."""
    message = exc.detail if isinstance(exc.detail, str) else "request could not be processed"
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(error_body(message, type_, None, None), status_code=exc.status_code, headers=exc.headers)
