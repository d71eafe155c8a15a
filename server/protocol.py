"""OpenAI request bodies (pydantic) and their translation to engine SamplingParams."""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from engine import tool_calls
from engine.errors import InvalidRequest
from engine.sampling_params import SamplingParams, StructuredOutputSpec

MAX_N = 64
MAX_STOP_STRINGS = 64
# Text is held back by the longest stop string's length while streaming; cap it so a stream
# cannot be silenced (and a body cannot smuggle megabytes into every step's search).
MAX_STOP_STRING_CHARS = 1024


class StreamOptions(BaseModel):
    include_usage: bool = False
    # roseinfer's extension: the final chunk carries "timing" (where the request's time went).
    include_timing: bool = False


class StructuredOutputsParams(BaseModel):
    """vLLM's `structured_outputs` object: exactly one of these."""

    json_: Union[dict, str, None] = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingFields(BaseModel):
    # Unknown fields are ignored, as vLLM does; known fields are type-checked.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's structured outputs: the older guided_* fields, or the structured_outputs object
    guided_json: Union[dict, str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def structured_output_spec(self) -> StructuredOutputSpec | None:
        """The constraint the request asks for, or None; more than one is a 400."""
        found: list[tuple[str, StructuredOutputSpec]] = []
        so = self.structured_outputs
        for param, value, make in (
            ("guided_json", self.guided_json, StructuredOutputSpec.json_schema),
            ("guided_regex", self.guided_regex, lambda v: StructuredOutputSpec("regex", v)),
            ("guided_choice", self.guided_choice, StructuredOutputSpec.choice),
            ("guided_grammar", self.guided_grammar, lambda v: StructuredOutputSpec("grammar", v)),
            ("structured_outputs.json", so and so.json_, StructuredOutputSpec.json_schema),
            ("structured_outputs.regex", so and so.regex, lambda v: StructuredOutputSpec("regex", v)),
            ("structured_outputs.choice", so and so.choice, StructuredOutputSpec.choice),
            ("structured_outputs.grammar", so and so.grammar, lambda v: StructuredOutputSpec("grammar", v)),
            ("structured_outputs.json_object", so and so.json_object, lambda v: StructuredOutputSpec("json_object")),
        ):
            if value is not None and value is not False:
                found.append((param, make(value)))
        if len(found) > 1:
            raise InvalidRequest(f"give one output constraint, not {', '.join(p for p, _ in found)}",
                                 param=found[1][0])
        return found[0][1] if found else None

    def check_common(self) -> None:
        if self.n < 1 or self.n > MAX_N:
            raise InvalidRequest(f"n must be in [1, {MAX_N}], got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        stops = self.stop_strings()
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise InvalidRequest(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters", param="stop")

    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple, whether the request gave one string, a list or nothing."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None, choice_index: int = 0,
                           structured_output: StructuredOutputSpec | None = None) -> SamplingParams:
        self.check_common()
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise InvalidRequest("logit_bias keys must be token ids", param="logit_bias") from None
        stop = self.stop_strings()
        seed = None if self.seed is None else self.seed + choice_index  # n choices must differ
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            logit_bias=bias,  # type: ignore[arg-type]
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            structured_output=structured_output,
        )


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: Union[str, dict, None] = None


class ToolCall(BaseModel):
    """A call in an assistant message of the history."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True

    def tool_dicts(self) -> list[dict]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def tool_mode(self) -> tuple[str, dict | None]:
        """("none" | "auto" | "required" | "named", the named tool), engine/tool_calls.py."""
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        return tool_calls.resolve_mode(self.tool_dicts(), choice)

    def structured_output_spec(self) -> StructuredOutputSpec | None:
        """The output constraint: response_format, vLLM's fields, or what tool_choice enforces."""
        spec = super().structured_output_spec()
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            if spec is not None:
                raise InvalidRequest("give response_format or a guided/structured_outputs field, not both",
                                     param="response_format")
            if fmt.type == "json_object":
                spec = StructuredOutputSpec("json_object")
            elif fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise InvalidRequest("response_format json_schema needs json_schema.schema", param="response_format")
            else:
                spec = StructuredOutputSpec.json_schema(fmt.json_schema.schema_)
        mode, named = self.tool_mode()
        enforced = tool_calls.constraint(mode, self.tool_dicts(), named, self.parallel_tool_calls)
        if enforced is not None and spec is not None:
            raise InvalidRequest(f"tool_choice {self.tool_choice!r} already constrains the output; drop response_format",
                                 param="tool_choice")
        return enforced or spec

    def logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self, template_takes_tools: bool = False) -> list[dict]:
        """The messages as the chat template gets them, tools and tool calls included."""
        messages = []
        for m in self.messages:
            msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name,
                    "arguments": c.function.arguments if isinstance(c.function.arguments, str)
                    else json.dumps(c.function.arguments or {})}} for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        mode, _ = self.tool_mode()
        tools = self.tool_dicts() if mode != "none" else None
        return tool_calls.template_messages(messages, tools, template_takes_tools)


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
