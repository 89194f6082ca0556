"""Marshmallow schemas of the OpenAI-compatible routes (/v1), with OpenAI's defaults.

They accept what OpenAI's API reference documents for /v1/completions and
/v1/chat/completions (openai/openai-openapi), in three kinds:

- fields the server honours, loaded with the engine's meaning (SamplingSchema's keys: chat's
  `logprobs: true` + `top_logprobs: k` and completions' `logprobs: k` load as the engine's
  `logprobs` = k);
- fields that do not change the output (`user`, `metadata`, `store`, ...): accepted and
  dropped (IGNORED);
- fields that would change it and that the server cannot honour (tools, audio, ...):
  accepted at their neutral value only (`tool_choice: "none"`, `modalities: ["text"]`), any
  other value is a 400 that names the field, not a silently different answer (NEUTRAL).

Structured output comes in three spellings, one per request: `structured_outputs`
(SamplingSchema's, as on /api/v1), OpenAI's `response_format` and vLLM's `guided_*`
(tursi.api.structured_schemas); all load as the engine's `constraint`.

Unknown fields are a 400, as OpenAI answers them, and `null` is the default everywhere
(schemas.StrictSchema).
"""

from __future__ import annotations

import json
from typing import Any

from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from .schemas import (
    MAX_PROMPT_CHARS,
    MAX_STOP_STRINGS,
    JsonBoolean,
    JsonInteger,
    SamplingSchema,
    StrictSchema,
    choices_field,
    logprobs_field,
    max_tokens_field,
    model_field,
    stop_string_field,
    temperature_field,
    token_id_field,
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

OPENAI_COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_PROMPT_TOKENS = MAX_PROMPT_CHARS  # token ids in one prompt (the context is the real cap)
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on /v1/completions' logprobs
CHAT_ROLES = ("system", "developer", "user", "assistant")
TOOLS = "tool calling is not supported by this server yet"


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
        self.items = fields.List(item, validate=validate.Length(max=max_items))

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
        ids = fields.List(token_id_field(), validate=validate.Length(min=1, max=MAX_PROMPT_TOKENS))
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
    """A chat role; tool and function results belong to tool calling (not supported)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        role = super()._deserialize(value, attr, data, **kwargs)
        if role in ("tool", "function"):
            raise ValidationError(f'role "{role}": {TOOLS}')
        if role not in CHAT_ROLES:
            raise ValidationError(f"must be one of: {', '.join(CHAT_ROLES)}")
        return role


class MessageSchema(StrictSchema):
    role = Role(required=True, metadata={"enum": list(CHAT_ROLES)})
    content = MessageContent(required=True)
    name = fields.String()  # the speaker's name: templates have no place for it, so unused
    # An assistant turn that called tools, spoke audio or refused: none of it is text the
    # template can replay.
    tool_calls = neutral([], why=TOOLS)
    function_call = neutral(why=TOOLS)
    audio = neutral(why="audio is not supported by this server")
    refusal = neutral(why="refusal turns are not supported: send the text as content")

    @post_load
    def _text_only(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {"role": data["role"], "content": data["content"]}


class ChatCompletionRequestSchema(OpenAIRequestSchema):
    messages = fields.List(
        fields.Nested(MessageSchema), required=True, validate=validate.Length(min=1, max=1000)
    )
    max_tokens = max_tokens_field()
    max_completion_tokens = JsonInteger(validate=validate.Range(min=1), load_default=None)
    logprobs = JsonBoolean(load_default=False)
    top_logprobs = JsonInteger(validate=validate.Range(min=0, max=20), load_default=None)

    # Accepted and ignored: they do not change the output.
    metadata = ignored(
        fields.Dict(
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
    parallel_tool_calls = ignored(JsonBoolean())

    # Accepted at their neutral value only.
    tools = neutral([], why=TOOLS)
    tool_choice = neutral("none", why=TOOLS)
    functions = neutral([], why=TOOLS)
    function_call = neutral("none", why=TOOLS)
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
