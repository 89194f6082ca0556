"""Tool calling on /v1/chat/completions, in one call format: how the tools reach the prompt,
the grammar that makes the model's calls valid by construction, and how its output is read
back as OpenAI's `tool_calls` (docs/tools.md).

The call format is Hermes' (NousResearch's Hermes 2 and 3, Qwen 2.5 and 3, SmolLM3 were
trained on it; vLLM's `hermes` parser reads it), one block per call, blocks separated by a
newline:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

It is the most common format among open models, it is plain text (no special tokens, so
any tokenizer can write it), and the JSON in it is exactly what a grammar can hold to the
function's `parameters`. A model whose chat template renders `tools` is shown them by its
template; any other is told the format by a fallback system prompt (`fallback_prompt`).
Either way calls are only read from output the grammar constrained (tool_choice auto,
required or a named function), so every call read is a call of one of the request's
functions whose arguments validate against its `parameters`.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..engine.jobs import Constraint
from ..engine.worker import ModelWorker
from ..errors import InvalidRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
WHITESPACE = " \t\r\n"
# The JSON the grammar lets the model write: no free whitespace (a small model can run on in
# spaces until max_tokens) and json.dumps' separators, as prompts and templates show calls.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# The auto grammar's text alternative: any text in which `<tool_call>` does not occur, so
# that every `<tool_call>` the model writes opens a constrained call.
TEXT_RULE = r"TEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/"
# The longest grammar a request's tools may make: the engine's bound on a grammar
# (tursi.engine.constraints.MAX_GRAMMAR_CHARS), checked here to name `tools` in the 400.
MAX_GRAMMAR_CHARS = 32_768


@dataclass
class Tools:
    """The tools a request offers the model (tursi.api.openai_schemas loads them; a request
    whose tool_choice is "none", or that has no tools, has none).

    functions: OpenAI's function definitions ({"name", "description"?, "parameters"}, the
    parameters an object schema); choice: "auto" (text or calls), "required" (calls only) or
    "function" (calls of `name` only); parallel: several calls in one answer allowed."""

    functions: list[dict[str, Any]]
    choice: str = "auto"
    name: str | None = None
    parallel: bool = True

    @functools.cached_property
    def grammar(self) -> str:
        return grammar(self)

    def callable(self) -> list[dict[str, Any]]:
        """The functions the model may call (the named one, or all)."""
        return [f for f in self.functions if self.name in (None, f["name"])]

    def specs(self) -> list[dict[str, Any]]:
        """OpenAI's tool objects, as chat templates take them (every tool, as OpenAI shows
        the model every tool whatever tool_choice names)."""
        return [{"type": "function", "function": function} for function in self.functions]


# --- the prompt ----------------------------------------------------------------------------


def chat_prompt(
    worker: ModelWorker,
    messages: list[dict[str, Any]],
    tools: Tools | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt of chat `messages` (tursi.api.openai_schemas.MessageSchema's shape: tool
    calls on assistant messages, tool results as role "tool") offering `tools`.

    Messages without tool turns and without tools render exactly as before tools existed. A
    template that renders `tools` gets the messages and tools as transformers documents them
    (call arguments as objects). Any other template gets the tools described by
    `fallback_prompt` in the system message, and an assistant's calls as text in the call
    format; tool results stay role "tool" messages (ChatML templates, SmolLM2's among them,
    print any role, and a model answers from a result there better than from a user turn),
    or, when the template refuses that role, become user turns of <tool_response> blocks."""
    if tools is None and not any(_is_tool_turn(message) for message in messages):
        return worker.chat_prompt(messages, add_generation_prompt)
    if renders_tools(worker):
        specs = tools.specs() if tools is not None else None
        return worker.chat_prompt(_for_template(messages), add_generation_prompt, tools=specs)
    instructions = [] if tools is None else [fallback_prompt(tools)]
    try:
        return worker.chat_prompt(_as_text(messages, *instructions), add_generation_prompt)
    except InvalidRequest:
        if not any(message["role"] == "tool" for message in messages):
            raise
    shaped = _as_text(messages, *instructions, results_as_user=True)
    return worker.chat_prompt(shaped, add_generation_prompt)


PROBE = [{"role": "user", "content": "Hello"}]
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "probe_tool",
            "description": "A probe",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]


def renders_tools(worker: ModelWorker) -> bool:
    """Whether the model's chat template shows `tools` at all: a template that ignores them
    renders the same prompt with and without (SmolLM2's does); one that cannot render even
    a plain user message has no say (the real messages get its 400)."""
    try:
        return worker.chat_prompt(PROBE, tools=PROBE_TOOLS) != worker.chat_prompt(PROBE)
    except InvalidRequest:
        return False


def _is_tool_turn(message: dict[str, Any]) -> bool:
    return message["role"] == "tool" or bool(message.get("tool_calls"))


def _for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as tool-aware templates read them: a call's arguments as an object (OpenAI
    sends JSON text; templates write `arguments | tojson`), a tool result with the name of
    the function it answers (some templates print it)."""
    names: dict[str, str] = {}
    shaped = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                names[call["id"]] = call["function"]["name"]
                function = {**call["function"], "arguments": _arguments(call)}
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        elif message["role"] == "tool" and message["tool_call_id"] in names:
            message["name"] = names[message["tool_call_id"]]
        shaped.append(message)
    return shaped


def _arguments(call: dict[str, Any]) -> Any:
    """A call's arguments as JSON (OpenAI sends them as JSON text); text that is no JSON
    object stays text, as the client sent it."""
    try:
        value = json.loads(call["function"]["arguments"])
    except ValueError:
        return call["function"]["arguments"]
    return value if isinstance(value, dict) else call["function"]["arguments"]


def call_text(name: str, arguments: Any) -> str:
    """One call in the call format."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def _as_text(
    messages: list[dict[str, Any]], *instructions: str, results_as_user: bool = False
) -> list[dict[str, Any]]:
    """Tool turns as text any template renders: an assistant's calls appended to its content
    in the call format; tool results as role "tool" messages, or as user turns (consecutive
    results in one) of <tool_response> blocks, as Hermes-format models read them;
    `instructions` at the end of the system message."""
    shaped: list[dict[str, Any]] = []
    previous = None
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "tool" and results_as_user:
            block = f"<tool_response>\n{content}\n</tool_response>"
            if previous == "tool":
                shaped[-1]["content"] += "\n" + block
            else:
                shaped.append({"role": "user", "content": block})
        elif message.get("tool_calls"):
            parts = [content] if content else []
            parts += [
                call_text(call["function"]["name"], _arguments(call))
                for call in message["tool_calls"]
            ]
            shaped.append({"role": role, "content": "\n".join(parts)})
        else:
            shaped.append({"role": role, "content": content})
        previous = role
    for text in instructions:
        shaped = _with_system(shaped, text)
    return shaped


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """`text` at the end of the first message when it is a system (or developer) message,
    else as a system message of its own, first."""
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def fallback_prompt(tools: Tools) -> str:
    """What a model whose template ignores `tools` is told: the tools, the call format, and
    what tool_choice asks of it (the grammar holds it to that anyway)."""
    listed = "\n".join(json.dumps(spec, ensure_ascii=False) for spec in tools.specs())
    if tools.choice == "function":
        rule = f'Answer with a call of the function "{tools.name}"'
        rule += "." if tools.parallel else ", only one."
    elif tools.choice == "required":
        rule = "Answer with function calls only." if tools.parallel else "Answer with one call."
    else:
        rule = "When no function is needed, answer with text."
        rule += "" if tools.parallel else " Make at most one call."
    return "\n".join(
        [
            "You can call functions to answer. Their definitions, one JSON object per line:",
            "<tools>",
            listed,
            "</tools>",
            "To call a function, write a JSON object with its name and its arguments between "
            f"{OPEN} and {CLOSE}, one block per call:",
            OPEN,
            '{"name": "<function name>", "arguments": {<arguments, as JSON>}}',
            CLOSE,
            rule,
        ]
    )


# --- the grammar ---------------------------------------------------------------------------


def constraint(tools: Tools | None) -> Constraint | None:
    """The constraint of a request that offers tools (none without)."""
    return None if tools is None else Constraint("grammar", tools.grammar)


def grammar(tools: Tools) -> str:
    """llguidance Lark text whose strings are exactly the answers `tools` allows.

    A call is `<tool_call>\\n{"name": "<name>", "arguments": ` + JSON valid against that
    function's parameters (llguidance's `%json`, each function's schema its own document, so
    its `$ref`s resolve) + `}\\n</tool_call>`; with parallel_tool_calls several calls follow
    one another, a newline apart, else exactly one. tool_choice required or a named function:
    nothing but calls (of that function). auto: calls (after optional whitespace), or text
    in which `<tool_call>` does not occur (TEXT_RULE); text and calls in one answer are not
    allowed (small models mix them badly, and the text would have to be held back anyway).
    """
    rules = ["%llguidance {}"]
    names = []
    for number, function in enumerate(tools.callable()):
        head = json.dumps(f'{{"name": {json.dumps(function["name"])}, "arguments": ')
        parameters = closed(function["parameters"])
        schema = json.dumps({**parameters, "x-guidance": JSON_OPTIONS})
        rules.append(f"call_{number}: {head} %json {schema} " + r'"}\n</tool_call>"')
        names.append(f"call_{number}")
    rules.append("call: " + " | ".join(names))
    more = r' ("\n<tool_call>\n" call)*' if tools.parallel else ""
    if tools.choice == "auto":
        rules += [
            "start: TEXT | calls",
            TEXT_RULE,
            "calls: CALL_OPEN call" + more,
            r"CALL_OPEN: /[ \t\r\n]*<tool_call>\n/",
        ]
    else:
        rules.append(r'start: "<tool_call>\n" call' + more)
    return "\n".join(rules) + "\n"


# Where a JSON schema holds schemas: one (`items`...), a list (`anyOf`...) or a map of them.
_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Keywords that add properties to an object from elsewhere: such an object stays open.
_MERGING = ("allOf", "anyOf", "oneOf", "$ref", "if", "dependentSchemas", "unevaluatedProperties")


def closed(schema: Any) -> Any:
    """`schema` with every object that lists its properties closed to others
    (`additionalProperties: false`) unless it says otherwise, as OpenAI's strict mode and
    vLLM's grammars have it: JSON Schema's default lets a model add keys, and a small one
    fills its arguments with made-up keys (copies of the schema's own words) until
    max_tokens. Every value valid against the result is valid against `schema`. An object
    whose properties may come from elsewhere stays open: one beside allOf, anyOf, oneOf,
    $ref or if; a branch of an allOf of several, or of allOf/anyOf/oneOf beside properties;
    and what a $ref in such a place points to."""
    merged: set[str] = set()  # JSON pointers of the schemas merged with others
    while True:
        found: set[str] = set()
        _merged_refs(schema, "#", False, merged, found)
        if found <= merged:
            return _closed(schema, "#", False, merged)
        merged |= found


def _subschemas(schema: dict[str, Any]) -> Any:
    """(key, index or name or None, subschema, merged with its siblings) of each subschema."""
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            yield key, None, schema[key], False
    for key in _LIST:
        if isinstance(schema.get(key), list):
            # allOf's branches are merged with each other, any branch with properties beside
            joined = "properties" in schema and key in ("allOf", "anyOf", "oneOf")
            joined = joined or (key == "allOf" and len(schema[key]) > 1)
            for index, item in enumerate(schema[key]):
                yield key, index, item, joined
    for key in _MAP:
        if isinstance(schema.get(key), dict):
            for name, value in schema[key].items():
                yield key, name, value, False


def _pointer(pointer: str, key: str, step: Any) -> str:
    pointer += "/" + key
    if step is not None:
        pointer += "/" + str(step).replace("~", "~0").replace("/", "~1")
    return pointer


def _merged_refs(schema: Any, pointer: str, merged: bool, known: set[str], found: set[str]):
    if not isinstance(schema, dict):
        return
    merged = merged or pointer in known
    if isinstance(schema.get("$ref"), str) and (merged or "properties" in schema):
        found.add(schema["$ref"])
    for key, step, child, joined in _subschemas(schema):
        _merged_refs(child, _pointer(pointer, key, step), joined, known, found)


def _closed(schema: Any, pointer: str, merged: bool, known: set[str]) -> Any:
    if not isinstance(schema, dict):
        return schema
    merged = merged or pointer in known
    shaped = dict(schema)
    for key in (*_LIST, *_MAP):
        if isinstance(shaped.get(key), (list, dict)):
            shaped[key] = type(shaped[key])(shaped[key])  # a copy to change
    for key, step, child, joined in _subschemas(schema):
        value = _closed(child, _pointer(pointer, key, step), joined, known)
        if step is None:
            shaped[key] = value
        else:
            shaped[key][step] = value
    if "properties" in shaped and not merged and not any(key in shaped for key in _MERGING):
        shaped.setdefault("additionalProperties", False)
    return shaped


def tools_refused(error: InvalidRequest) -> InvalidRequest:
    """The engine's 400 for a grammar it cannot use (a parameters schema llguidance does not
    support, too complex...), said of `tools`: the client sent no grammar."""
    message = error.message.partition(": ")[2] or error.message
    message = message.replace("the grammar", "the grammar of the tools' calls", 1)
    details = {key: value for key, value in error.details.items() if key != "field"}
    return InvalidRequest(f"tools: {message}", {**details, "fields": {"tools": [message]}})


# --- reading the output back ---------------------------------------------------------------

_DECODER = json.JSONDecoder()
_CALL_START = re.compile(r"[ \t\r\n]*<tool_call>[ \t\r\n]*")
_CALL_END = re.compile(r"[ \t\r\n]*</tool_call>")


class CallReader:
    """Reads one choice's output, whole or as it streams, into content and calls.

    An answer is calls when it starts (after whitespace) with `<tool_call>`, else text: the
    auto grammar allows nothing else. Until the first characters tell which (whitespace, or
    a beginning of `<tool_call>`), nothing is released; then text goes out as it comes, and
    each call once its `</tool_call>` is read. A call left unfinished (max_tokens, a stop
    string) is dropped: its arguments are no valid JSON."""

    def __init__(self) -> None:
        self.buffer = ""
        self.calling: bool | None = None  # None: not known yet
        self.calls = 0  # read so far

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """The content and the whole calls that `text` (the next piece of output) completes."""
        self.buffer += text
        if self.calling is None:
            head = self.buffer.lstrip(WHITESPACE)
            if not head or (len(head) < len(OPEN) and OPEN.startswith(head)):
                return "", []
            self.calling = head.startswith(OPEN)
        if not self.calling:
            content, self.buffer = self.buffer, ""
            return content, []
        return "", self._whole_calls()

    def close(self) -> str:
        """At the end of the output: the content still held back (an answer that never
        became a call)."""
        content = "" if self.calling else self.buffer
        self.buffer = ""
        return content

    def _whole_calls(self) -> list[dict[str, Any]]:
        calls = []
        while True:
            start = _CALL_START.match(self.buffer)
            if start is None or CLOSE not in self.buffer[start.end() :]:
                return calls
            try:
                value, end = _DECODER.raw_decode(self.buffer, start.end())
            except ValueError:
                return calls  # the arguments hold "</tool_call>" and go on
            close = _CALL_END.match(self.buffer, end)
            if close is None:
                return calls
            self.buffer = self.buffer[close.end() :]
            if _is_call(value):
                calls.append(tool_call(value["name"], value["arguments"]))
                self.calls += 1


def _is_call(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("name"), str)
        and isinstance(value.get("arguments"), dict)
    )


def tool_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One call as OpenAI answers it: arguments as JSON text."""
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def read(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole choice's content (None when it is calls) and its calls."""
    reader = CallReader()
    content, calls = reader.feed(text)
    content += reader.close()
    return (None if reader.calling else content), calls
