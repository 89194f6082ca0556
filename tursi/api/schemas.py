"""Marshmallow schemas for every request body and query. Unknown fields are rejected (400)."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from ..engine.catalog import DTYPES, QUANT_BITS, QUANT_MODES

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_PROMPT_CHARS = 200_000


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


# JSON's own types, nothing coerced: marshmallow's Boolean also takes "yes" or 1, its Float
# takes "0.7", and its strict Integer takes true; a typed client never sends those.
class JsonBoolean(fields.Boolean):
    """true or false."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class JsonNumber(fields.Float):
    """A finite JSON number (an integer or a float)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class JsonInteger(fields.Integer):
    """A JSON integer (not 5.0, not "5", not true)."""

    def __init__(self, **kwargs: Any):
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class LoadRequestSchema(StrictSchema):
    quantize = JsonBoolean(load_default=False)
    bits = JsonInteger(validate=validate.OneOf(QUANT_BITS), load_default=None)
    mode = fields.String(validate=validate.OneOf(QUANT_MODES), load_default=None)
    dtype = fields.String(validate=validate.OneOf(DTYPES), load_default=None)

    @validates_schema
    def _quantize_needed(self, data: dict[str, Any], **_: Any) -> None:
        if not data.get("quantize"):
            given = [name for name in ("bits", "mode") if data.get(name) is not None]
            if given:
                raise ValidationError('needs "quantize": true', given[0])


# Fields shared by /api/v1/generate and the OpenAI-compatible routes (which set their own
# defaults). Each call makes a new field object: a field belongs to one schema.
def model_field() -> fields.Field:
    return fields.String(required=True, validate=validate.Length(min=1, max=128))


def temperature_field(default: float, **kwargs: Any) -> fields.Field:
    return JsonNumber(validate=validate.Range(min=0.0, max=2.0), load_default=default, **kwargs)


def top_p_field(default: float, **kwargs: Any) -> fields.Field:
    return JsonNumber(
        validate=validate.Range(min=0.0, max=1.0, min_inclusive=False),
        load_default=default,
        **kwargs,
    )


def top_k_field() -> fields.Field:
    """0 means no top-k cut."""
    return JsonInteger(validate=validate.Range(min=0, max=1_000_000), load_default=0)


def repetition_penalty_field() -> fields.Field:
    """1 means none; above 1 discourages tokens already in the prompt or the output."""
    return JsonNumber(
        validate=validate.Range(min=0.0, max=10.0, min_inclusive=False), load_default=1.0
    )


def seed_field() -> fields.Field:
    return JsonInteger(validate=validate.Range(min=0, max=2**63 - 1), load_default=None)


def stop_string_field() -> fields.Field:
    return fields.String(validate=validate.Length(min=1, max=MAX_STOP_LENGTH))


def max_tokens_field() -> fields.Field:
    return JsonInteger(validate=validate.Range(min=1), load_default=None)


SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "stop",
    "seed",
    "ignore_eos",
)


class GenerateRequestSchema(StrictSchema):
    model = model_field()
    prompt = fields.String(required=True, validate=validate.Length(min=1, max=MAX_PROMPT_CHARS))
    max_tokens = max_tokens_field()
    temperature = temperature_field(0.7)
    top_p = top_p_field(0.9)
    top_k = top_k_field()
    repetition_penalty = repetition_penalty_field()
    stop = fields.List(
        stop_string_field(), validate=validate.Length(max=MAX_STOP_STRINGS), load_default=list
    )
    stream = JsonBoolean(load_default=False)
    return_full_text = JsonBoolean(load_default=True)
    seed = seed_field()
    ignore_eos = JsonBoolean(load_default=False)


class EmptyQuerySchema(StrictSchema):
    """Endpoints that take no query parameters."""


class UnloadRequestSchema(StrictSchema):
    """Unload takes no fields: no body, or an empty object."""
