"""Typed errors the engine raises; `server/` maps each to one HTTP status."""


class EngineError(Exception):
    """Base class. `param` names the offending request field, if any."""

    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(EngineError):
    """The request is malformed or asks for something out of range."""

    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    """Prompt (plus requested tokens) does not fit the model's context."""

    code = "context_length_exceeded"


class UnknownModel(EngineError):
    """The model name is neither built in nor a local path we can load."""

    code = "model_not_found"


class EngineOverloaded(EngineError):
    """Too many requests are queued; the caller should retry later."""

    code = "engine_overloaded"


class EngineDead(EngineError):
    """The engine loop stopped after an internal failure."""

    code = "engine_dead"
