"""Per-request sampling and stopping parameters."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from engine.errors import InvalidRequest

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class StructuredOutputSpec:
    """What the output must match. `value`: the schema as canonical JSON text (json_schema), the
    regex, the JSON list of choices (choice), the EBNF grammar (grammar), or "" (json_object).
    JSON comes out compact (no free whitespace): a small model given free whitespace can fill
    max_tokens with newlines."""

    kind: Literal["json_schema", "json_object", "regex", "choice", "grammar"]
    value: str = ""

    @staticmethod
    def json_schema(schema: dict | str) -> StructuredOutputSpec:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"the JSON schema is not valid JSON: {exc}", param="response_format") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("a JSON schema must be an object", param="response_format")
        # Key order kept: properties are generated in the order the schema lists them.
        return StructuredOutputSpec("json_schema", json.dumps(schema, separators=(",", ":")))

    @staticmethod
    def choice(options: list[str]) -> StructuredOutputSpec:
        if not options or not all(isinstance(o, str) and o for o in options):
            raise InvalidRequest("choice needs a list of non-empty strings", param="guided_choice")
        return StructuredOutputSpec("choice", json.dumps(list(options)))


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    `temperature == 0` means greedy. `top_k <= 0` and `top_p == 1` disable those
    filters. `max_tokens=None` generates until EOS, a stop, or the context ends.
    Validation happens at construction, so an invalid value never reaches the loop.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Constrained decoding (engine/structured_output.py): the output must match this.
    structured_output: StructuredOutputSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(
                self, "logit_bias", tuple((int(k), float(v)) for k, v in self.logit_bias.items())
            )
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{param} {why}", param=param)

        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator takes
            raise bad("seed", f"must fit in 64 bits, got {self.seed}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0:
            raise bad("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", "must not exceed max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise bad("stop", "must not contain empty strings")
        for _, bias in self.logit_bias:
            if not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", f"values must be in [-100, 100], got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
