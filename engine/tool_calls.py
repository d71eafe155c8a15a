"""Tool calling: how tools reach the prompt, how `tool_choice` constrains the output, and how the
output becomes OpenAI `tool_calls`, whole or streamed. Plain Python over text and dicts.

Three modes, as vLLM serves them:
- "auto": the model decides; calls are parsed from what it writes in the Hermes/Qwen format
  (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as many as it likes) or as one
  bare Llama 3 style JSON object (`{"name": ..., "parameters": {...}}`).
- "required": the output is constrained to a JSON array of `{"name", "arguments"}` objects, one
  per call, each name one of the tools and its arguments valid for that tool's parameters.
- a named function: the output is constrained to that function's arguments object.

A chat template that takes `tools` renders them itself; for one that does not (SmolLM2's), they
are listed in a system message in the Hermes format, earlier assistant calls are written back as
`<tool_call>` blocks and tool results go in as `tool` messages.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from engine.errors import InvalidRequest
from engine.sampling_params import StructuredOutputSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def function_of(tool: dict) -> dict:
    return tool["function"]


def parameters_schema(tool: dict) -> dict:
    """The tool's parameters schema (an empty object schema when it takes none)."""
    return function_of(tool).get("parameters") or {"type": "object", "properties": {}}


def resolve_mode(tools: list[dict] | None, tool_choice: str | dict | None) -> tuple[str, dict | None]:
    """("none" | "auto" | "required" | "named", the named tool). OpenAI's default is "auto" with
    tools and "none" without."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return "none", None
    if tool_choice is None or tool_choice == "auto":
        return "auto", None
    if tool_choice in ("none", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        for tool in tools:
            if function_of(tool)["name"] == name:
                return "named", tool
        raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    raise InvalidRequest(f"tool_choice must be none, auto, required or a named function, got {tool_choice!r}",
                         param="tool_choice")


def constraint(mode: str, tools: list[dict], named: dict | None, parallel: bool) -> StructuredOutputSpec | None:
    """The grammar that enforces "required" or a named function (None for "auto" and "none")."""
    if mode == "named":
        assert named is not None
        return StructuredOutputSpec.json_schema(parameters_schema(named))
    if mode != "required":
        return None
    calls = [{"type": "object", "properties": {"name": {"const": function_of(t)["name"]},
                                               "arguments": parameters_schema(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputSpec.json_schema(schema)


def system_prompt(tools: list[dict]) -> str:
    """The Hermes tool prompt, for templates that do not render tools themselves."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You are a function calling AI model. You may call one or more functions to assist with the user "
            "query. Here are the available tools:\n<tools>\n" + listed + "\n</tools>\nFor each function call, "
            "return a json object with the function name and arguments within <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def template_messages(messages: list[dict], tools: list[dict] | None, template_takes_tools: bool) -> list[dict]:
    """`messages` (OpenAI shape, tool calls and tool results included) as the chat template gets
    them: unchanged for a template that renders tools, else with the tool prompt in the system
    message, assistant calls written as `<tool_call>` blocks and every content a string."""
    if template_takes_tools:  # templates index arguments as a mapping
        return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _arguments_object(c)}}
                                     for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
    out = []
    for m in messages:
        content = m.get("content") or ""
        blocks = [OPEN + "\n" + json.dumps({"name": c["function"]["name"], "arguments": _arguments_object(c)},
                                            ensure_ascii=False) + "\n" + CLOSE for c in m.get("tool_calls") or []]
        if blocks:
            content = "\n".join(([content] if content else []) + blocks)
        out.append({"role": m["role"], "content": content})
    if tools:
        prompt = system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _arguments_object(call: dict):
    args = call["function"].get("arguments")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse(text: str, mode: str, tools: list[dict], named: dict | None) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) from a finished output. Output that does not parse stays content."""
    names = {function_of(t)["name"] for t in tools}
    if mode == "named":
        assert named is not None
        return None, [ParsedCall(function_of(named)["name"], text)]
    if mode == "required":
        try:
            items = json.loads(text)
            return None, [ParsedCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in items]
        except (json.JSONDecodeError, TypeError, KeyError):
            return text, []
    if mode != "auto":
        return text, []
    calls = []
    for body in _BLOCK.findall(text):
        call = _call_from_json(body, names)
        if call is not None:
            calls.append(call)
    if calls:
        content = _BLOCK.sub("", text).strip()
        return content or None, calls
    bare = _call_from_json(text.strip(), names)  # Llama 3: the whole output is one call
    return (None, [bare]) if bare is not None else (text, [])


def _call_from_json(body: str, names: set[str]) -> ParsedCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


class ToolCallStream:
    """Turns a streamed output into OpenAI chat deltas: `{"content": ...}` for text, and
    `{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}` with the id,
    type and name once per call, then `{"tool_calls": [{"index", "function": {"arguments": ...}}]}`
    fragments. "named" and "required" stream argument text as it arrives; "auto" passes text
    through, holds back anything that may start a `<tool_call>` block, and sends a block's call
    whole once it closes."""

    def __init__(self, mode: str, tools: list[dict], named: dict | None) -> None:
        self.mode, self.tools, self.named = mode, tools, named
        self.names = {function_of(t)["name"] for t in tools}
        self.num_calls = 0
        self.buffer = ""  # auto: text not yet sent; required: JSON not yet scanned
        self._scanner = _CallArrayScanner() if mode == "required" else None

    def feed(self, text: str) -> list[dict]:
        if not text:
            return []
        if self.mode == "named":
            deltas = []
            if self.num_calls == 0:
                self.num_calls = 1
                deltas.append(self._header(0, function_of(self.named)["name"]))
            deltas.append(self._arguments(0, text))
            return deltas
        if self.mode == "required":
            deltas = []
            for event, index, value in self._scanner.feed(text):
                if event == "name":
                    self.num_calls = index + 1
                    deltas.append(self._header(index, value))
                elif value:
                    deltas.append(self._arguments(index, value))
            return deltas
        if self.mode != "auto":
            return [{"content": text}]
        self.buffer += text
        return self._drain_auto(final=False)

    def finish(self) -> list[dict]:
        """What is still held back once the output ends."""
        return self._drain_auto(final=True) if self.mode == "auto" else []

    def _drain_auto(self, final: bool) -> list[dict]:
        deltas = []
        while self.buffer:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self.buffer, OPEN)
                if len(self.buffer) > keep:
                    deltas.append({"content": self.buffer[: len(self.buffer) - keep]})
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            if start > 0:
                deltas.append({"content": self.buffer[:start]})
                self.buffer = self.buffer[start:]
            end = self.buffer.find(CLOSE)
            if end < 0:
                if final:  # an unclosed block: what the model wrote stays text
                    deltas.append({"content": self.buffer})
                    self.buffer = ""
                break
            block, self.buffer = self.buffer[: end + len(CLOSE)], self.buffer[end + len(CLOSE):]
            call = _call_from_json(block[len(OPEN):-len(CLOSE)].strip(), self.names)
            if call is None:
                deltas.append({"content": block})
                continue
            index = self.num_calls
            self.num_calls += 1
            deltas.append(self._header(index, call.name))
            deltas.append(self._arguments(index, call.arguments))
        return [d for d in deltas if d.get("content") != ""]

    @staticmethod
    def _header(index: int, name: str) -> dict:
        return {"tool_calls": [{"index": index, "id": new_call_id(), "type": "function",
                                "function": {"name": name, "arguments": ""}}]}

    @staticmethod
    def _arguments(index: int, text: str) -> dict:
        return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (held back: the marker may follow)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class _CallArrayScanner:
    """Reads `[{"name": "f", "arguments": {...}}, ...]` (the "required" grammar's output) one piece
    at a time and reports ("name", call index, name) once a name is complete and ("arguments",
    call index, raw text) for each piece of an arguments value, outside its own syntax."""

    def __init__(self) -> None:
        self.depth = 0  # brackets open, the outer array included
        self.in_string = False
        self.escaped = False
        self.call = -1
        self.key = ""  # the call object's key being read, or the one whose value follows
        self.reading_key = False
        self.token = ""  # the current string at depth 2 (a key or the name)
        self.in_arguments = False
        self.args_depth = 0
        self._started = False  # the arguments value has begun (whitespace before it is skipped)

    def feed(self, text: str) -> list[tuple[str, int, str]]:
        events: list[tuple[str, int, str]] = []
        args = []
        for ch in text:
            if self.in_arguments:
                if self._arguments_char(ch):
                    args.append(ch)
                    continue
                if args:
                    events.append(("arguments", self.call, "".join(args)))
                    args = []
            self._structure_char(ch, events)
        if args:
            events.append(("arguments", self.call, "".join(args)))
        return events

    def _arguments_char(self, ch: str) -> bool:
        """Whether `ch` still belongs to the arguments value (tracks its nesting and strings)."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
            return True
        if ch == '"':
            self.in_string = self._started = True
            return True
        if ch in "{[":
            self.args_depth += 1
            self._started = True
            return True
        if ch in "}]":
            if self.args_depth == 0:  # the call object closes
                self.in_arguments = False
                return False
            self.args_depth -= 1
            return True
        if ch == "," and self.args_depth == 0:  # a scalar value ended
            self.in_arguments = False
            return False
        if self.args_depth == 0 and ch.isspace() and not self._started:
            return False
        self._started = True
        return True

    def _structure_char(self, ch: str, events: list) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
                self.token += ch
            elif ch == "\\":
                self.escaped = True
                self.token += ch
            elif ch == '"':
                self.in_string = False
                if self.reading_key:
                    self.key, self.reading_key = json.loads('"' + self.token + '"'), False
                elif self.key == "name":
                    events.append(("name", self.call, json.loads('"' + self.token + '"')))
            else:
                self.token += ch
            return
        if ch == '"':
            self.in_string, self.token = True, ""
            # At depth 2, a string right after '{' or ',' is a key; after ':' it is a value.
            return
        if ch in "{[":
            self.depth += 1
            if self.depth == 2 and ch == "{":
                self.call += 1
                self.reading_key, self.key = True, ""
            return
        if ch in "}]":
            self.depth -= 1
            return
        if self.depth == 2:
            if ch == ",":
                self.reading_key, self.key = True, ""
            elif ch == ":":
                self.reading_key = False
                if self.key == "arguments":
                    self.in_arguments, self.args_depth, self._started = True, 0, False
