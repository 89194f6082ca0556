"""Marshmallow schemas of the OpenAI-compatible routes (/v1), with OpenAI's defaults.

OpenAI fields this server cannot honour are accepted only at their neutral value (for
example `n` = 1, `presence_penalty` = 0), so that a client gets a clear 400 instead of a
silently different answer. Unknown fields are rejected, as on /api/v1.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from .schemas import (
    MAX_PROMPT_CHARS,
    MAX_STOP_STRINGS,
    JsonBoolean,
    JsonInteger,
    JsonNumber,
    SamplingSchema,
    StrictSchema,
    max_tokens_field,
    model_field,
    stop_string_field,
    temperature_field,
    top_p_field,
)

OPENAI_COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_ROLES = ("system", "developer", "user", "assistant")


def _only(value: Any, what: str) -> validate.Validator:
    return validate.Equal(value, error=f"only {what} is supported by this server")


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


class OpenAIRequestSchema(SamplingSchema):
    """What completions and chat completions share: the sampling fields, with OpenAI's
    defaults and nulls for temperature and top_p and its string-or-list `stop`."""

    model = model_field()
    temperature = temperature_field(1.0, allow_none=True)
    top_p = top_p_field(1.0, allow_none=True)
    stop = TextOrList(stop_string_field(), MAX_STOP_STRINGS, load_default=list, allow_none=True)
    stream = JsonBoolean(load_default=False)
    stream_options = fields.Nested(StreamOptionsSchema, load_default=None, allow_none=True)
    n = JsonInteger(validate=_only(1, "n = 1"), load_default=1)
    user = fields.String(load_default=None)  # accepted, not used
    presence_penalty = JsonNumber(validate=_only(0, "presence_penalty = 0"), allow_none=True)
    frequency_penalty = JsonNumber(validate=_only(0, "frequency_penalty = 0"), allow_none=True)
    logit_bias = fields.Dict(
        validate=validate.Length(max=0, error="logit_bias is not supported"), allow_none=True
    )

    @post_load
    def _defaults(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        for name in ("temperature", "top_p"):
            if data.get(name) is None:  # OpenAI clients send null for "default"
                data[name] = self.fields[name].load_default
        data["stop"] = data.get("stop") or []
        return data


class CompletionRequestSchema(OpenAIRequestSchema):
    prompt = fields.Raw(required=True)
    max_tokens = JsonInteger(
        validate=validate.Range(min=1),
        load_default=OPENAI_COMPLETION_DEFAULT_MAX_TOKENS,
        allow_none=True,
    )
    echo = JsonBoolean(load_default=False)
    logprobs = JsonInteger(validate=_only(0, "logprobs = null"), allow_none=True)
    best_of = JsonInteger(validate=_only(1, "best_of = 1"), allow_none=True)
    suffix = fields.String(
        validate=validate.Length(max=0, error="suffix is not supported"), allow_none=True
    )

    @validates_schema
    def _one_prompt(self, data: dict[str, Any], **_: Any) -> None:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ValidationError("must be a string (or a list of one string)", "prompt")
        if not 1 <= len(prompt) <= MAX_PROMPT_CHARS:
            raise ValidationError(f"length must be between 1 and {MAX_PROMPT_CHARS}", "prompt")

    @post_load
    def _prompt_text(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        if isinstance(data["prompt"], list):
            data["prompt"] = data["prompt"][0]
        return data


class ContentPartSchema(StrictSchema):
    type = fields.String(required=True, validate=_only("text", 'type "text"'))
    text = fields.String(required=True)


class MessageContent(fields.Field):
    """A message's content: a string, or a list of text parts (joined)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            parts = ContentPartSchema(many=True).load(value)
            return "".join(part["text"] for part in parts)
        raise ValidationError("must be a string or a list of text parts")


class MessageSchema(StrictSchema):
    role = fields.String(required=True, validate=validate.OneOf(CHAT_ROLES))
    content = MessageContent(required=True)
    name = fields.String()


class ResponseFormatSchema(StrictSchema):
    type = fields.String(required=True, validate=_only("text", 'type "text"'))


class ChatCompletionRequestSchema(OpenAIRequestSchema):
    messages = fields.List(
        fields.Nested(MessageSchema), required=True, validate=validate.Length(min=1, max=1000)
    )
    max_tokens = max_tokens_field()
    max_completion_tokens = JsonInteger(validate=validate.Range(min=1), load_default=None)
    logprobs = JsonBoolean(validate=_only(False, "logprobs = false"), allow_none=True)
    response_format = fields.Nested(ResponseFormatSchema, allow_none=True)

    @post_load
    def _max_tokens(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        data["max_tokens"] = data.get("max_completion_tokens") or data.get("max_tokens")
        data["messages"] = [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
        return data
