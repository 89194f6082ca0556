"""Request schemas of the tokenizer routes (tursi.api.tokenize): the native ones under
/api/v1, and the root /tokenize and /detokenize with vLLM's and llama.cpp's field names.

Each loads as {model, text | messages, add_special_tokens, add_generation_prompt,
with_pieces} (tokenize) or {model, tokens} (detokenize), whichever names the client used.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from .openai_schemas import MAX_PROMPT_TOKENS, ChatMessages
from .schemas import MAX_PROMPT_CHARS, JsonBoolean, StrictSchema, model_field, token_ids_field


def _text() -> fields.Field:
    return fields.String(validate=validate.Length(max=MAX_PROMPT_CHARS))


def _messages() -> fields.Field:
    return ChatMessages()


def _special() -> fields.Field:
    # Default: true for text (as a prompt is tokenized), false for messages (the chat
    # template writes the special tokens itself).
    return JsonBoolean(load_default=None)


def _one_of(data: dict[str, Any], names: tuple[str, ...]) -> None:
    given = [name for name in names if data.get(name) is not None]
    if len(given) != 1:
        raise ValidationError(
            f"give exactly one of {', '.join(names)}", given[-1] if given else names[0]
        )


class TokenizeRequestSchema(StrictSchema):
    """POST /api/v1/tokenize."""

    model = model_field()
    text = _text()
    messages = _messages()
    add_special_tokens = _special()
    add_generation_prompt = JsonBoolean(load_default=True)  # with messages

    @validates_schema
    def _text_or_messages(self, data: dict[str, Any], **_: Any) -> None:
        _one_of(data, ("text", "messages"))

    @post_load
    def _shape(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {"text": None, "messages": None, "with_pieces": False, **data}


class DetokenizeRequestSchema(StrictSchema):
    """POST /api/v1/detokenize."""

    model = model_field()
    tokens = token_ids_field(0, MAX_PROMPT_TOKENS, required=True)


class CompatTokenizeRequestSchema(StrictSchema):
    """POST /tokenize: vLLM's {model, prompt | messages, add_special_tokens,
    add_generation_prompt} and llama.cpp's {content, add_special, with_pieces}. `model` may
    be left out when one model is loaded."""

    model = fields.String(validate=validate.Length(min=1, max=128))
    prompt = _text()  # vLLM
    content = _text()  # llama.cpp
    messages = _messages()  # vLLM's chat form
    add_special_tokens = _special()  # vLLM
    add_special = _special()  # llama.cpp
    add_generation_prompt = JsonBoolean(load_default=True)
    with_pieces = JsonBoolean(load_default=False)  # llama.cpp: [{"id", "piece"}]

    @validates_schema
    def _one_text(self, data: dict[str, Any], **_: Any) -> None:
        _one_of(data, ("prompt", "content", "messages"))
        if data.get("add_special_tokens") is not None and data.get("add_special") is not None:
            raise ValidationError("give add_special_tokens or add_special, not both", "add_special")

    @post_load
    def _shape(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        special = data.pop("add_special_tokens", None)
        if special is None:
            special = data.pop("add_special", None)
            if special is None and data.get("content") is not None:
                special = False  # llama.cpp's default
        text = data.pop("prompt", None)
        if text is None:
            text = data.pop("content", None)
        return {
            "model": data.get("model"),
            "text": text,
            "messages": data.get("messages"),
            "add_special_tokens": special,
            "add_generation_prompt": data["add_generation_prompt"],
            "with_pieces": data["with_pieces"],
        }


class CompatDetokenizeRequestSchema(StrictSchema):
    """POST /detokenize: {model?, tokens} (vLLM's and llama.cpp's names)."""

    model = fields.String(validate=validate.Length(min=1, max=128))
    tokens = token_ids_field(0, MAX_PROMPT_TOKENS, required=True)

    @post_load
    def _shape(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {"model": None, **data}
