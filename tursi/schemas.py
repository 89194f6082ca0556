"""Marshmallow schemas for every request body and query. Unknown fields are rejected (400)."""
from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from .engine.catalog import DTYPES, QUANT_BITS, QUANT_MODES

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_PROMPT_CHARS = 200_000


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class LoadRequestSchema(StrictSchema):
    quantize = fields.Boolean(load_default=False)
    bits = fields.Integer(strict=True, validate=validate.OneOf(QUANT_BITS), load_default=None)
    mode = fields.String(validate=validate.OneOf(QUANT_MODES), load_default=None)
    dtype = fields.String(validate=validate.OneOf(DTYPES), load_default=None)

    @validates_schema
    def _quantize_needed(self, data: dict[str, Any], **_: Any) -> None:
        if not data.get("quantize"):
            given = [name for name in ("bits", "mode") if data.get(name) is not None]
            if given:
                raise ValidationError("needs \"quantize\": true", given[0])


class GenerateRequestSchema(StrictSchema):
    model = fields.String(required=True, validate=validate.Length(min=1, max=128))
    prompt = fields.String(required=True,
                           validate=validate.Length(min=1, max=MAX_PROMPT_CHARS))
    max_tokens = fields.Integer(strict=True, validate=validate.Range(min=1), load_default=None)
    temperature = fields.Float(validate=validate.Range(min=0.0, max=2.0), load_default=0.7)
    top_p = fields.Float(validate=validate.Range(min=0.0, max=1.0, min_inclusive=False),
                         load_default=0.9)
    stop = fields.List(fields.String(validate=validate.Length(min=1, max=MAX_STOP_LENGTH)),
                       validate=validate.Length(max=MAX_STOP_STRINGS), load_default=list)
    stream = fields.Boolean(load_default=False)
    return_full_text = fields.Boolean(load_default=True)
    seed = fields.Integer(strict=True, validate=validate.Range(min=0, max=2**63 - 1),
                          load_default=None)
    ignore_eos = fields.Boolean(load_default=False)


class EmptyQuerySchema(StrictSchema):
    """Endpoints that take no query parameters."""
