"""roseinfer's engine: paged KV cache, continuous batching, models, sampling.

Exports resolve lazily so that the torch-free modules (block manager,
scheduler, sequence) import without pulling in torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "engine.llm",
    "CompletionOutput": "engine.llm",
    "AsyncEngine": "engine.async_engine",
    "LLMEngine": "engine.llm_engine",
    "RequestOutput": "engine.llm_engine",
    "TokenLogprob": "engine.llm_engine",
    "EngineConfig": "engine.config",
    "ModelConfig": "engine.config",
    "SamplingParams": "engine.sampling_params",
    "EngineError": "engine.errors",
    "InvalidRequest": "engine.errors",
    "ContextLengthExceeded": "engine.errors",
    "UnknownModel": "engine.errors",
    "EngineOverloaded": "engine.errors",
    "EngineDead": "engine.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
