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


def stop_string_field() -> fields.Field:
    return fields.String(validate=validate.Length(min=1, max=MAX_STOP_LENGTH))


def max_tokens_field() -> fields.Field:
    return JsonInteger(validate=validate.Range(min=1), load_default=None)


class SamplingSchema(StrictSchema):
    """The sampling parameters, one field per tursi.engine.jobs.SamplingParams field (the
    request keys are that dataclass's field names: tursi.api.jobs.sampling_params). Both
    APIs' request schemas derive from it; the OpenAI one overrides the defaults it differs on."""

    temperature = temperature_field(0.7)
    top_p = top_p_field(0.9)
    top_k = JsonInteger(validate=validate.Range(min=0, max=1_000_000), load_default=0)  # 0: none
    # 1 means none; above 1 discourages tokens already in the prompt or the output.
    repetition_penalty = JsonNumber(
        validate=validate.Range(min=0.0, max=10.0, min_inclusive=False), load_default=1.0
    )
    stop = fields.List(
        stop_string_field(), validate=validate.Length(max=MAX_STOP_STRINGS), load_default=list
    )
    seed = JsonInteger(validate=validate.Range(min=0, max=2**63 - 1), load_default=None)
    ignore_eos = JsonBoolean(load_default=False)  # as vLLM: keep going past end of sequence


class GenerateRequestSchema(SamplingSchema):
    model = model_field()
    prompt = fields.String(required=True, validate=validate.Length(min=1, max=MAX_PROMPT_CHARS))
    max_tokens = max_tokens_field()
    stream = JsonBoolean(load_default=False)
    return_full_text = JsonBoolean(load_default=True)


class EmptyQuerySchema(StrictSchema):
    """Endpoints that take no query parameters."""


class UnloadRequestSchema(StrictSchema):
    """Unload takes no fields: no body, or an empty object."""
