"""Gemma 4's function calls, both ways: the model's call syntax -> OpenAI's `tool_calls`, and OpenAI's
tool messages -> the form the checkpoint's chat template renders.

The model writes a call as `<|tool_call>call:NAME{key:VALUE,...}<tool_call|>`, with the values the
chat template's `format_argument` writes: strings between `<|"|>` marks, `true`/`false`, numbers,
`None`, `[...]` lists and `{key:...}` objects (keys bare, or quoted by the same marks). After a call the
model ends its output with `<|tool_response>`; the result comes back inside the same model turn as
`<|tool_response>response:NAME{...}<tool_response|>`, which the template writes from an assistant
message's `tool_responses` list. OpenAI clients send results as `role: "tool"` messages instead, so
`fold_tool_results` moves them into the assistant message that made the calls.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError

QUOTE = '<|"|>'  # the template's string delimiter
BARE_VALUES = {"true": True, "false": False, "None": None, "null": None, "none": None}
# Most tool definitions a request may bring (OpenAI's own cap).
MAX_TOOLS = 128
# Nesting of a value given to the chat template (a tool's schema, a call's arguments, a tool's result): its
# macros recurse once per level, so a deep value exhausts the interpreter's stack; real schemas stay far below.
MAX_NESTING = 64
# Schema nodes over all tool definitions: far above real tool sets, each node rendered into the prompt.
MAX_SCHEMA_NODES = 1 << 14
# OpenAI's function names, with the dots and colons other APIs allow: the call syntax has no room for spaces,
# braces or markers.
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# What the template reads as the names of a schema's own fields, never as property names.
_SCHEMA_KEYS = ("description", "type", "properties", "required", "nullable")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Levels of a value named in full in a fault's path; deeper ones are cut short.
_NAMED_LEVELS = 8


class ToolCallSyntaxError(ValueError):
    """Text between the tool-call markers that is not a well-formed `call:NAME{...}`."""


class ToolMessageError(InputError):
    """Chat messages whose tool calls or tool results cannot be rendered; the message says which."""


@dataclass
class ToolCall:
    """One function call the model made."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's shape: the arguments as a JSON string."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


def parse_tool_call(body: str, quote: str = QUOTE) -> ToolCall:
    """A call from the text between `<|tool_call>` and `<tool_call|>`."""
    text = body.strip()
    if not text.startswith("call:"):
        raise ToolCallSyntaxError(f"a tool call starts with 'call:', got {text[:40]!r}")
    brace = text.find("{")
    name = text[len("call:") : brace].strip() if brace != -1 else ""
    if not name or any(c.isspace() for c in name):
        raise ToolCallSyntaxError(f"no function name before '{{' in {text[:60]!r}")
    reader = _Reader(text, brace, quote)
    arguments = reader.object()
    if text[reader.pos :].strip():
        raise ToolCallSyntaxError(f"text after the arguments of {name}: {text[reader.pos :][:40]!r}")
    return ToolCall(name, arguments)


class _Reader:
    """Recursive descent over the template's value syntax."""

    def __init__(self, text: str, pos: int, quote: str) -> None:
        self.text, self.pos, self.quote = text, pos, quote

    def fail(self, what: str) -> ToolCallSyntaxError:
        return ToolCallSyntaxError(f"{what} at character {self.pos} of {self.text[:80]!r}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def value(self) -> Any:
        char = self.peek()
        if self.text.startswith(self.quote, self.pos):
            return self.string()
        if char == "{":
            return self.object()
        if char == "[":
            return self.array()
        return self.bare()

    def string(self) -> str:
        start = self.pos + len(self.quote)
        end = self.text.find(self.quote, start)
        if end == -1:
            raise self.fail("unterminated string")
        self.pos = end + len(self.quote)
        return self.text[start:end]

    def object(self) -> dict[str, Any]:
        self.pos += 1  # "{"
        result: dict[str, Any] = {}
        if self.peek() == "}":
            self.pos += 1
            return result
        while True:
            key = self.key()
            if self.peek() != ":":
                raise self.fail(f"expected ':' after key {key!r}")
            self.pos += 1
            result[key] = self.value()
            if not self.separator("}"):
                return result

    def array(self) -> list[Any]:
        self.pos += 1  # "["
        result: list[Any] = []
        if self.peek() == "]":
            self.pos += 1
            return result
        while True:
            result.append(self.value())
            if not self.separator("]"):
                return result

    def until(self, stops: str, missing: str) -> str:
        """The unquoted text up to the next of `stops`, stripped; `missing` if there is none."""
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in stops:
            self.pos += 1
        token = self.text[start : self.pos].strip()
        if not token:
            raise self.fail(missing)
        return token

    def separator(self, closing: str) -> bool:
        """True after a ',' (another item follows), False after the closing bracket."""
        char = self.peek()
        self.pos += 1
        if char == ",":
            return True
        if char == closing:
            return False
        raise self.fail(f"expected ',' or {closing!r}")

    def key(self) -> str:
        self.skip_space()
        if self.text.startswith(self.quote, self.pos):
            return self.string()
        return self.until(":{}[],", "empty key")

    def bare(self) -> Any:
        token = self.until(",}]", "missing value")
        if token in BARE_VALUES:
            return BARE_VALUES[token]
        try:
            number = json.loads(token)
        except ValueError:
            return token  # an unquoted word: kept as the string it is
        return number if isinstance(number, (int, float)) else token


def fold_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Gemma 4's template renders tool use: each `role: "tool"` message moved into the
    `tool_responses` of the assistant message whose `tool_calls` it answers (named by `tool_call_id`),
    an assistant reply right after those results joined to that same model turn, and JSON-string
    call arguments (OpenAI's form) parsed into the mappings the template writes. Other messages are
    returned as they are."""
    folded: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        last = folded[-1] if folded else {}
        host = last if last.get("role") == "assistant" and last.get("tool_calls") else None
        if role == "tool":
            if host is None:
                raise ToolMessageError(
                    f"messages[{index}]: a 'tool' message must follow an assistant message with tool_calls"
                )
            response = {"name": _called_name(host, message, index), "response": _tool_result(message, index)}
            host["tool_responses"] = [*host.get("tool_responses", []), response]
        elif role == "assistant" and _continues(host, message):
            host["content"] = message.get("content")
        elif role == "assistant" and message.get("tool_calls"):
            calls = [_template_call(call, index, number) for number, call in enumerate(message["tool_calls"])]
            folded.append({**message, "tool_calls": calls})
        else:
            folded.append(message)
    return folded


def _continues(host: dict[str, Any] | None, message: dict[str, Any]) -> bool:
    """An assistant reply that answers from the results of the calls just before it (same model turn)."""
    if host is None or not host.get("tool_responses") or message.get("tool_calls"):
        return False
    content = host.get("content")
    if isinstance(content, list):
        return not any(item.get("text") for item in content if isinstance(item, dict))
    return not content


def _template_call(call: Any, index: int, number: int) -> dict[str, Any]:
    where = f"messages[{index}].tool_calls[{number}]"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ToolMessageError(f"{where}: needs a function with a name")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as error:
            raise ToolMessageError(f"{where}.function.arguments: not JSON ({error})") from error
    if not isinstance(arguments, dict):
        raise ToolMessageError(f"{where}.function.arguments: must be a JSON object")
    fault = json_fault(arguments, MAX_NESTING)
    if fault is not None:
        raise ToolMessageError(f"{where}.function.arguments{fault[0]}: {fault[1]}")
    return {**call, "function": {**function, "arguments": arguments}}


def _called_name(host: dict[str, Any], message: dict[str, Any], index: int) -> str:
    call_id = message.get("tool_call_id")
    for call in host["tool_calls"]:
        if call_id is not None and call.get("id") == call_id:
            return call["function"]["name"]
    if message.get("name"):
        return str(message["name"])
    if len(host["tool_calls"]) == 1 and call_id is None:
        return host["tool_calls"][0]["function"]["name"]
    raise ToolMessageError(
        f"messages[{index}]: tool_call_id {call_id!r} matches none of the tool calls before it"
    )


def _tool_result(message: dict[str, Any], index: int) -> Any:
    """A result as the template takes it: a mapping (rendered key by key) or a string."""
    content = message.get("content")
    if isinstance(content, list):
        if any(not isinstance(item, dict) or item.get("type") != "text" for item in content):
            raise ToolMessageError(f"messages[{index}]: a tool result may hold text parts only")
        return "".join(item.get("text", "") for item in content)
    if content is None:
        return ""
    if isinstance(content, dict):
        fault = json_fault(content, MAX_NESTING)
        if fault is not None:
            raise ToolMessageError(f"messages[{index}].content{fault[0]}: {fault[1]}")
    if isinstance(content, (str, dict)):
        return content
    raise ToolMessageError(f"messages[{index}]: tool result content must be text, got {type(content).__name__}")


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's function tool definitions, checked: `[{"type": "function", "function": {"name": ...,
    "description": ..., "parameters": {JSON schema}}}]`. The schema is checked where the chat template
    reads it (`properties` an object of property schemas with a `type`, `required` a list of names),
    and bounded (`MAX_TOOLS`, `MAX_NESTING`, `MAX_SCHEMA_NODES`); text is checked for lone surrogates."""
    if not isinstance(tools, (list, tuple)):
        raise ToolMessageError(f"tools: must be a list of tool definitions, got {type(tools).__name__}")
    if len(tools) > MAX_TOOLS:
        raise ToolMessageError(f"tools: {len(tools)} tool definitions; at most {MAX_TOOLS} are taken")
    nodes = 0
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        fault = json_fault(tool, MAX_NESTING)
        if fault is not None:
            raise ToolMessageError(f"{where}{fault[0]}: {fault[1]}")
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ToolMessageError(f"{where}: only tools of type 'function' are supported")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolMessageError(f"{where}.function: needs a name")
        if not _FUNCTION_NAME.fullmatch(function["name"]):
            raise ToolMessageError(
                f"{where}.function.name: 1 to 64 letters, digits, '_', '-', '.' or ':', got {function['name']!r}"
            )
        if not isinstance(function.get("description", ""), str):
            raise ToolMessageError(f"{where}.function.description: must be a string")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            raise ToolMessageError(f"{where}.function.parameters: must be a JSON schema object")
        _check_schema(parameters, f"{where}.function.parameters", typed=False)
        nodes += sum(1 for _ in _values(tool))
        if nodes > MAX_SCHEMA_NODES:
            raise ToolMessageError(f"tools: the definitions hold more than {MAX_SCHEMA_NODES} values in all")
    return list(tools)


def _check_schema(schema: dict[str, Any], where: str, typed: bool) -> None:
    """The fields of a schema the chat template reads: a property's `type` (`typed`), `properties`
    (an object of property schemas), `required` (a list of names) and `items` (a schema)."""
    kind = schema.get("type")
    if (typed or kind is not None) and not _is_type(kind):
        raise ToolMessageError(f"{where}.type: a type name or a list of them is needed, got {kind!r}")
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            raise ToolMessageError(f"{where}.properties: must be an object of property schemas")
        for name, value in properties.items():
            if name in _SCHEMA_KEYS:
                continue  # the template skips these names
            if not isinstance(value, dict):
                raise ToolMessageError(f"{where}.properties.{name}: must be a schema object")
            _check_schema(value, f"{where}.properties.{name}", typed=True)
    elif typed and (kind if isinstance(kind, str) else kind[0]).upper() == "OBJECT":
        # An object without `properties`: the template reads the schema's other fields as its properties.
        for name, value in schema.items():
            if name not in _SCHEMA_KEYS and not (isinstance(value, dict) and _is_type(value.get("type"))):
                raise ToolMessageError(
                    f"{where}.{name}: an object schema without properties has its other fields read as "
                    "properties by the chat template; give its properties (or type string)"
                )
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise ToolMessageError(f"{where}.required: must be a list of property names")
    items = schema.get("items")
    if isinstance(items, dict):
        _check_schema(items, f"{where}.items", typed=False)


def _is_type(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(item, str) for item in value)


def _values(value: Any) -> Iterator[Any]:
    """Every value inside `value` (not itself), iteratively."""
    stack = [value]
    while stack:
        item = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            yield child
            stack.append(child)


def json_fault(value: Any, max_nesting: int) -> tuple[str, str] | None:
    """The first fault in a JSON value, as (path below `value`, what is wrong): nesting past
    `max_nesting` levels, or a lone UTF-16 surrogate (JSON's "\ud800") in a string or key, which no
    UTF-8 text holds; None when there is none. Iterative, so any depth is safe to check."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return path, "holds a lone UTF-16 surrogate, which is not text"
            continue
        if isinstance(item, dict):
            children = [(key, child, f".{key}") for key, child in item.items()]
        elif isinstance(item, (list, tuple)):
            children = [(None, child, f"[{index}]") for index, child in enumerate(item)]
        else:
            continue
        if depth >= max_nesting:
            return path, f"nested more than {max_nesting} levels deep"
        for key, child, step in reversed(children):
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                return path, "holds a key with a lone UTF-16 surrogate, which is not text"
            # Past _NAMED_LEVELS a path is cut short ("a.b…"): it names where the deep value starts.
            child_path = path + step if depth < _NAMED_LEVELS else path if path.endswith("…") else path + "…"
            stack.append((child, child_path, depth + 1))
    return None
