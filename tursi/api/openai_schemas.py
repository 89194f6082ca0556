"""Marshmallow schemas of the OpenAI-compatible routes (/v1), with OpenAI's defaults.

They accept what OpenAI's API reference documents for /v1/completions and
/v1/chat/completions (openai/openai-openapi), in three kinds:

- fields the server honours, loaded with the engine's meaning (SamplingSchema's keys: chat's
  `logprobs: true` + `top_logprobs: k` and completions' `logprobs: k` load as the engine's
  `logprobs` = k);
- fields that do not change the output (`user`, `metadata`, `store`, ...): accepted and
  dropped (IGNORED);
- fields that would change it and that the server cannot honour (audio, the deprecated
  `functions`, ...): accepted at their neutral value only (`function_call: "none"`,
  `modalities: ["text"]`), any other value is a 400 that names the field, not a silently
  different answer (NEUTRAL).

Structured output comes in three spellings, one per request: `structured_outputs`
(SamplingSchema's, as on /api/v1), OpenAI's `response_format` and vLLM's `guided_*`
(tursi.api.structured_schemas); all load as the engine's `constraint`.

Tools (`tools`, `tool_choice`, `parallel_tool_calls`, tool calls and results in messages)
load as a tursi.api.tools.Tools, or None when the model is offered none.

Unknown fields are a 400, as OpenAI answers them, and `null` is the default everywhere
(schemas.StrictSchema).
"""

from __future__ import annotations

import json
import re
from typing import Any

from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from .schemas import (
    MAX_PROMPT_CHARS,
    MAX_STOP_STRINGS,
    BoundedDict,
    BoundedList,
    JsonBoolean,
    JsonInteger,
    SamplingSchema,
    StrictSchema,
    cache_prompt_field,
    choices_field,
    logprobs_field,
    max_tokens_field,
    model_field,
    stop_string_field,
    temperature_field,
    token_ids_field,
    top_p_field,
)
from .structured_schemas import (
    ResponseFormatSchema,
    check_one_source,
    choice_field,
    grammar_field,
    json_schema_field,
    pop_constraint,
    regex_field,
)
from .tools import MAX_GRAMMAR_CHARS, Tools

OPENAI_COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_PROMPT_TOKENS = MAX_PROMPT_CHARS  # token ids in one prompt (the context is the real cap)
MAX_MESSAGES = 1000  # in one chat
# The text of a chat's messages: as much as one prompt may be (a prompt is at most
# MAX_PROMPT_CHARS characters however it is sent), in at most as many parts as messages.
MAX_CHAT_CHARS = MAX_PROMPT_CHARS
MAX_CONTENT_PARTS = MAX_MESSAGES
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on /v1/completions' logprobs
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
FUNCTIONS = "functions and function_call (deprecated by OpenAI) are not supported: use tools"
MAX_TOOLS = 128  # OpenAI's bound
MAX_TOOL_CALLS = 128  # calls in one assistant message
TOOL_CHOICES = ("none", "auto", "required")
MAX_PARAMETERS_DEPTH = 64  # JSON nesting of one function's parameters (schemas are walked)
NO_PARAMETERS = {"type": "object", "properties": {}}  # OpenAI: no parameters, no arguments


def ignored(field: fields.Field) -> fields.Field:
    """A field OpenAI documents that does not change the output: accepted, then dropped."""
    field.metadata = {**field.metadata, "ignored": True, "description": "accepted, ignored"}
    return field


class Neutral(validate.Validator):
    """Only the values that change nothing (null always passes: it is the default)."""

    def __init__(self, *values: Any, why: str):
        self.values, self.why = values, why

    def __call__(self, value: Any) -> Any:
        if value not in self.values:
            accepted = " or ".join(json.dumps(v) for v in self.values)
            only = f"; only {accepted} is accepted" if accepted else ""
            raise ValidationError(f"{self.why}{only}")
        return value


def neutral(*values: Any, why: str) -> fields.Field:
    """An OpenAI field the server cannot honour: any JSON value loads, and all but `values`
    (and null) are a 400 saying why; dropped once loaded."""
    accepted = ", ".join(json.dumps(value) for value in values)
    metadata: dict[str, Any] = {
        "neutral": True,
        "description": f"{why}; accepted: {accepted + ' or ' if accepted else ''}null",
        "enum": list(values) or [None],  # nothing but null
    }
    return fields.Raw(validate=Neutral(*values, why=why), metadata=metadata)


class TextOrList(fields.Field):
    """A string, or a list of strings (OpenAI's `stop`); loads as a list."""

    def __init__(self, item: fields.Field, max_items: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.items = BoundedList(item, validate=validate.Length(max=max_items))

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list[str]:
        if isinstance(value, str):
            value = [value]
        return self.items.deserialize(value, attr, data, **kwargs)


class StreamOptionsSchema(StrictSchema):
    include_usage = JsonBoolean(load_default=False)
    include_obfuscation = ignored(JsonBoolean())  # obfuscation pads chunks; nothing to hide


class OpenAIRequestSchema(SamplingSchema):
    """What completions and chat completions share: the sampling fields with OpenAI's
    defaults and its string-or-list `stop`; the engine's prompt_logprobs is no OpenAI field
    (completions' echo sets it)."""

    class Meta(SamplingSchema.Meta):
        exclude = ("prompt_logprobs",)

    model = model_field()
    temperature = temperature_field(1.0)
    top_p = top_p_field(1.0)
    stop = TextOrList(stop_string_field(), MAX_STOP_STRINGS, load_default=list)
    stream = JsonBoolean(load_default=False)
    stream_options = fields.Nested(StreamOptionsSchema, load_default=None)
    n = choices_field()
    cache_prompt = cache_prompt_field()  # an extension, llama.cpp's (extra_body)
    user = ignored(fields.String())
    # Structured output besides structured_outputs: OpenAI's field and vLLM's older ones.
    response_format = fields.Nested(
        ResponseFormatSchema,
        load_default=None,
        metadata={"description": "OpenAI's: text, json_object, json_schema"},
    )
    guided_json = json_schema_field()
    guided_regex = regex_field()
    guided_choice = choice_field()
    guided_grammar = grammar_field()
    # One backend here (llguidance), whichever is named; a whitespace pattern would change
    # the JSON written, which has no whitespace between its tokens.
    guided_decoding_backend = ignored(fields.String(validate=validate.Length(max=64)))
    guided_whitespace_pattern = neutral(why="a whitespace pattern is not supported")

    @validates_schema
    def _one_constraint(self, data: dict[str, Any], **_: Any) -> None:
        check_one_source(data)

    @post_load
    def _constraint_of_any_source(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        data["constraint"] = pop_constraint(data)
        return data

    @post_load
    def _drop_what_changes_nothing(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        for name, field in self.fields.items():
            if field.metadata.get("ignored") or field.metadata.get("neutral"):
                data.pop(name, None)
        data.setdefault("prompt_logprobs", None)
        return data


class Prompts(fields.Field):
    """OpenAI's completion `prompt`: a string, a list of strings, a list of token ids or a
    list of lists of token ids (a list may mix strings and token-id lists); loads as the
    list of prompts, each a string or token ids."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list:
        if isinstance(value, str):
            value = [value]
        elif isinstance(value, list) and value and all(_is_int(item) for item in value):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ValidationError(
                "must be a string, a list of strings, a list of token ids or a list of lists "
                "of token ids, not empty"
            )
        if len(value) > MAX_PROMPTS:
            raise ValidationError(f"at most {MAX_PROMPTS} prompts")
        text = fields.String(validate=validate.Length(min=1, max=MAX_PROMPT_CHARS))
        ids = token_ids_field(1, MAX_PROMPT_TOKENS)
        prompts: list[str | list[int]] = []
        for index, prompt in enumerate(value):
            if not isinstance(prompt, (str, list)):
                raise ValidationError({index: ["must be a string or a list of token ids"]})
            try:
                prompts.append((text if isinstance(prompt, str) else ids).deserialize(prompt))
            except ValidationError as exc:
                raise ValidationError({index: exc.messages}) from None
        return prompts


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CompletionRequestSchema(OpenAIRequestSchema):
    prompts = Prompts(required=True, data_key="prompt")
    # 0 only with echo: the prompt is scored (its logprobs), nothing generated.
    max_tokens = JsonInteger(
        validate=validate.Range(min=0), load_default=OPENAI_COMPLETION_DEFAULT_MAX_TOKENS
    )
    echo = JsonBoolean(load_default=False)
    logprobs = logprobs_field(MAX_COMPLETION_LOGPROBS)
    # best_of choices generated, the n with the highest cumulative logprob returned.
    best_of = JsonInteger(validate=validate.Range(min=1, max=16), load_default=None)
    suffix = neutral("", why="suffix (insertion) is not supported by this server")

    @validates_schema
    def _consistent(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("max_tokens") == 0 and not data.get("echo"):
            raise ValidationError("must be at least 1 (0 only with echo: true)", "max_tokens")
        best_of = data.get("best_of")
        if best_of is not None:
            if best_of < data.get("n", 1):
                raise ValidationError("must be greater than or equal to n", "best_of")
            if best_of > 1 and data.get("stream"):
                raise ValidationError("cannot be used with stream: true (as OpenAI)", "best_of")

    @post_load
    def _echo_scores_the_prompt(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        data["prompt_logprobs"] = data["logprobs"] if data["echo"] else None
        return data


class ContentPartSchema(StrictSchema):
    type = fields.String(required=True, validate=validate.Equal("text"))
    text = fields.String(required=True)
    prompt_cache_breakpoint = ignored(fields.Raw())


class MessageContent(fields.Field):
    """A message's content: a string, or a list of text parts (joined). Other parts (images,
    audio, files) are refused by name."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            for index, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValidationError(
                        {index: [f'content parts of type "{kind}" are not supported: text only']}
                    )
            parts = ContentPartSchema(many=True).load(value)
            return "".join(part["text"] for part in parts)
        raise ValidationError("must be a string or a list of text parts")


class Role(fields.String):
    """A chat role; "function" (the deprecated functions' results) is refused by name."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        role = super()._deserialize(value, attr, data, **kwargs)
        if role == "function":
            raise ValidationError(f'role "function": {FUNCTIONS} (results: role "tool")')
        if role not in CHAT_ROLES:
            raise ValidationError(f"must be one of: {', '.join(CHAT_ROLES)}")
        return role


FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _function_name(name: str) -> None:
    if FUNCTION_NAME.fullmatch(name) is None:  # fullmatch: `$` would let "f\n" through
        raise ValidationError("must be 1 to 64 letters, digits, _ or -")


def function_name_field(**kwargs: Any) -> fields.Field:
    """A function's name, as OpenAI bounds it (it goes into prompts and grammars as is)."""
    return fields.String(
        validate=_function_name,
        metadata={"pattern": f"^{FUNCTION_NAME.pattern}$"},
        **kwargs,
    )


def function_type_field() -> fields.Field:
    return fields.String(
        required=True,
        validate=validate.Equal("function", error='only "function" tools are supported'),
    )


class CalledFunctionSchema(StrictSchema):
    name = function_name_field(required=True)
    arguments = fields.String(required=True, validate=validate.Length(max=MAX_PROMPT_CHARS))


class ToolCallSchema(StrictSchema):
    """A call an earlier assistant message made (as this API answered it)."""

    id = fields.String(required=True, validate=validate.Length(min=1, max=256))
    type = function_type_field()
    function = fields.Nested(CalledFunctionSchema, required=True)
    # The call's place in a streamed answer: the openai SDK's stream helper leaves it in the
    # message it rebuilds, which callers send back as is.
    index = ignored(JsonInteger())


class MessageSchema(StrictSchema):
    role = Role(required=True, metadata={"enum": list(CHAT_ROLES)})
    # Required, but for an assistant message with tool_calls (null or absent there).
    content = MessageContent(
        metadata={"description": "required; null only on an assistant message with tool_calls"}
    )
    name = fields.String()  # the speaker's name: templates have no place for it, so unused
    tool_calls = BoundedList(
        fields.Nested(ToolCallSchema),
        validate=validate.Length(max=MAX_TOOL_CALLS),
        metadata={"description": "assistant messages only"},
    )
    tool_call_id = fields.String(
        validate=validate.Length(min=1, max=256),
        metadata={"description": "tool messages only (required there): the call answered"},
    )
    # An assistant turn that spoke audio or refused: none of it is text the template can
    # replay; function_call belongs to the deprecated functions.
    function_call = neutral(why=FUNCTIONS)
    audio = neutral(why="audio is not supported by this server")
    refusal = neutral(why="refusal turns are not supported: send the text as content")

    @validates_schema
    def _consistent(self, data: dict[str, Any], **_: Any) -> None:
        role = data.get("role")
        if data.get("tool_calls") and role != "assistant":
            raise ValidationError("only assistant messages carry tool calls", "tool_calls")
        if data.get("content") is None and not (role == "assistant" and data.get("tool_calls")):
            raise ValidationError(
                "Missing data for required field (null only with tool_calls).", "content"
            )
        if role == "tool" and data.get("tool_call_id") is None:
            raise ValidationError("Missing data for required field.", "tool_call_id")
        if role != "tool" and data.get("tool_call_id") is not None:
            raise ValidationError("only tool messages answer a call", "tool_call_id")

    @post_load
    def _shape(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        """{"role", "content"} (content "" for calls without text), with "tool_calls" on an
        assistant message that made calls, "tool_call_id" on a tool message."""
        message = {"role": data["role"], "content": data.get("content") or ""}
        if data.get("tool_calls"):
            message["tool_calls"] = [
                {"id": call["id"], "type": "function", "function": dict(call["function"])}
                for call in data["tool_calls"]
            ]
        if data["role"] == "tool":
            message["tool_call_id"] = data["tool_call_id"]
        return message


class ChatMessages(BoundedList):
    """The messages of a chat: 1..MAX_MESSAGES, at most MAX_CONTENT_PARTS content parts and
    MAX_CHAT_CHARS characters of text in all (checked before any message is loaded:
    check_text_size), and every tool result answers a call an earlier assistant message made (as
    OpenAI checks)."""

    def __init__(self, **kwargs: Any):
        super().__init__(
            fields.Nested(MessageSchema),
            validate=validate.Length(min=1, max=MAX_MESSAGES),
            **kwargs,
        )

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list:
        self.check_length(value)
        if isinstance(value, list):
            check_text_size(value)
        messages = super()._deserialize(value, attr, data, **kwargs)
        called: set[str] = set()
        for index, message in enumerate(messages):
            called.update(call["id"] for call in message.get("tool_calls", ()))
            if message["role"] == "tool" and message["tool_call_id"] not in called:
                raise ValidationError(
                    {index: {"tool_call_id": ["answers no tool call of an earlier message"]}}
                )
        return messages


def check_text_size(messages: list) -> None:
    """Refuse messages, as the client sent them, with more than MAX_CONTENT_PARTS content
    parts or MAX_CHAT_CHARS characters of text in all (every content string and text part,
    every tool call's arguments; what is not of the documented types counts nothing: loading
    the messages refuses it). Counting is cheap and loading is not (a schema load per
    message and per part, and a 1 MB body holds 36,000 parts), so this comes first."""
    contents = [message.get("content") for message in messages if isinstance(message, dict)]
    parts = sum(len(content) for content in contents if isinstance(content, list))
    if parts > MAX_CONTENT_PARTS:
        raise ValidationError(
            f"at most {MAX_CONTENT_PARTS} content parts in all messages together "
            f"(these have {parts})"
        )
    texts = [content for content in contents if isinstance(content, str)]
    for content in contents:
        if isinstance(content, list):
            texts += [part.get("text") for part in content if isinstance(part, dict)]
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            texts.append(function.get("arguments") if isinstance(function, dict) else None)
    chars = sum(len(text) for text in texts if isinstance(text, str))
    if chars > MAX_CHAT_CHARS:
        raise ValidationError(
            f"at most {MAX_CHAT_CHARS} characters of text in all messages together "
            f"(these have {chars})"
        )


class Parameters(fields.Dict):
    """A function's `parameters`: a JSON schema of an object (OpenAI's rule: the arguments
    are an object; "type": "object" is added when absent); absent or {}: no parameters
    (the arguments are {})."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> dict:
        schema = super()._deserialize(value, attr, data, **kwargs)
        if _depth(schema) > MAX_PARAMETERS_DEPTH:
            raise ValidationError(f"must be nested at most {MAX_PARAMETERS_DEPTH} deep")
        if schema.get("type", "object") != "object":
            raise ValidationError('must be a JSON schema of "type": "object"')
        try:
            json.dumps(schema, allow_nan=False)
        except ValueError:
            raise ValidationError("must be JSON (NaN and Infinity are not)") from None
        return {"type": "object", **schema} if schema else dict(NO_PARAMETERS)


def _depth(value: Any) -> int:
    """How deep JSON `value` nests (a scalar: 0), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend(
                (item, depth) for item in (value.values() if isinstance(value, dict) else value)
            )
    return deepest


class FunctionSchema(StrictSchema):
    name = function_name_field(required=True)
    description = fields.String(validate=validate.Length(max=MAX_PROMPT_CHARS))
    parameters = Parameters(load_default=lambda: dict(NO_PARAMETERS))
    # Calls always follow `parameters` (the grammar), strict or not.
    strict = JsonBoolean(metadata={"description": "accepted: calls always follow parameters"})

    @post_load
    def _defined(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {key: value for key, value in data.items() if key != "strict"}


class ToolSchema(StrictSchema):
    type = function_type_field()
    function = fields.Nested(FunctionSchema, required=True)


class FunctionNameSchema(StrictSchema):
    name = function_name_field(required=True)


class NamedToolChoiceSchema(StrictSchema):
    type = function_type_field()
    function = fields.Nested(FunctionNameSchema, required=True)


class ToolChoice(fields.Field):
    """ "none", "auto", "required", or {"type": "function", "function": {"name"}}; loads as
    the string or the function's name in a 1-tuple."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            if value not in TOOL_CHOICES:
                raise ValidationError(f"must be one of: {', '.join(TOOL_CHOICES)}, or a function")
            return value
        if isinstance(value, dict):
            if value.get("type") in ("allowed_tools", "custom"):
                raise ValidationError(f'"{value["type"]}" tool choices are not supported')
            return (NamedToolChoiceSchema().load(value)["function"]["name"],)
        raise ValidationError('must be "none", "auto", "required" or a function')


class ChatCompletionRequestSchema(OpenAIRequestSchema):
    messages = ChatMessages(required=True)
    max_tokens = max_tokens_field()
    max_completion_tokens = JsonInteger(validate=validate.Range(min=1), load_default=None)
    logprobs = JsonBoolean(load_default=False)
    top_logprobs = JsonInteger(validate=validate.Range(min=0, max=20), load_default=None)

    # Accepted and ignored: they do not change the output.
    metadata = ignored(
        BoundedDict(
            keys=fields.String(validate=validate.Length(max=64)),
            values=fields.String(validate=validate.Length(max=512)),
            validate=validate.Length(max=16),
        )
    )
    store = ignored(JsonBoolean())
    service_tier = ignored(fields.String())
    prompt_cache_key = ignored(fields.String())
    prompt_cache_retention = ignored(fields.String())
    prompt_cache_options = ignored(fields.Dict())
    safety_identifier = ignored(fields.String(validate=validate.Length(max=64)))

    # Tool calling (tursi.api.tools).
    tools = BoundedList(fields.Nested(ToolSchema), validate=validate.Length(max=MAX_TOOLS))
    tool_choice = ToolChoice(
        metadata={
            "description": '"none", "auto" (the default with tools), "required", or '
            '{"type": "function", "function": {"name"}}'
        }
    )
    parallel_tool_calls = JsonBoolean(load_default=True)

    # Accepted at their neutral value only.
    functions = neutral([], why=FUNCTIONS)
    function_call = neutral("none", why=FUNCTIONS)
    modalities = neutral(["text"], why="output other than text is not supported by this server")
    audio = neutral(why="audio output is not supported by this server")
    prediction = neutral(why="predicted outputs are not supported by this server")
    web_search_options = neutral(why="web search is not supported by this server")
    reasoning_effort = neutral(
        "none", why="reasoning effort is not supported (these models do not reason)"
    )
    verbosity = neutral("medium", why="steering verbosity is not supported by this server")
    moderation = neutral(why="moderation is not supported by this server")

    @validates_schema
    def _top_logprobs_needs_logprobs(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("top_logprobs") is not None and not data.get("logprobs"):
            raise ValidationError("needs logprobs: true (as OpenAI)", "top_logprobs")

    @validates_schema
    def _tools_consistent(self, data: dict[str, Any], **_: Any) -> None:
        functions = [tool["function"] for tool in data.get("tools") or ()]
        names = [function["name"] for function in functions]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValidationError(f"function names must be unique: {', '.join(repeated)}", "tools")
        choice = data.get("tool_choice")
        if choice not in (None, "none") and not functions:
            raise ValidationError("needs tools (as OpenAI)", "tool_choice")
        if isinstance(choice, tuple) and choice[0] not in names:
            raise ValidationError(f'"{choice[0]}" is none of the tools\' functions', "tool_choice")

    @post_load
    def _tools(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        """tools, tool_choice and parallel_tool_calls as one Tools, or None when none are
        offered (no tools, or tool_choice "none")."""
        functions = [tool["function"] for tool in data.pop("tools", None) or ()]
        choice = data.pop("tool_choice", None) or "auto"
        parallel = data.pop("parallel_tool_calls")
        tools = None
        if functions and choice != "none":
            named = choice[0] if isinstance(choice, tuple) else None
            tools = Tools(functions, "function" if named else choice, named, parallel)
            if len(tools.grammar) > MAX_GRAMMAR_CHARS:
                raise ValidationError(
                    f"the grammar of these functions' calls would take {len(tools.grammar)} "
                    f"characters; at most {MAX_GRAMMAR_CHARS} (fewer or smaller parameters)",
                    "tools",
                )
        data["tools"] = tools
        return data

    @post_load
    def _engine_fields(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        """max_completion_tokens (OpenAI's current name) wins over max_tokens; logprobs true
        + top_logprobs k is the engine's logprobs = k (0 without top_logprobs)."""
        completion_tokens = data.pop("max_completion_tokens")
        if completion_tokens is not None:
            data["max_tokens"] = completion_tokens
        top = data.pop("top_logprobs")
        data["logprobs"] = (top or 0) if data["logprobs"] else None
        return data


# The fields each schema accepts and ignores, and those it takes only at a neutral value
# (docs/openai.md lists them; tests/app/test_openai_fields.py checks the lists).
def field_names(schema: type[StrictSchema], kind: str) -> list[str]:
    return sorted(
        field.data_key or name
        for name, field in schema().fields.items()
        if field.metadata.get(kind)
    )
