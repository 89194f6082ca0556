"""The request fields that ask for structured output, each loaded as the
tursi.engine.jobs.Constraint that the engine decodes under (docs/structured-output.md):

- `structured_outputs` (both APIs, vLLM's name; SamplingSchema's `constraint`): an object
  with exactly one of `json` (a JSON schema), `json_object` (true: any JSON object), `regex`,
  `choice` (a list of strings) or `grammar` (Lark, or llama.cpp's GBNF);
- on /v1 also OpenAI's `response_format` (`json_object`, `json_schema`) and vLLM's older
  `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`
  (tursi.api.openai_schemas declares them with the fields below; one source per request).

Shapes and sizes are checked here, a 400 naming the field; what only compiling finds (a
regex that does not parse, a schema keyword llguidance does not support, a grammar too
complex to compile in time) is the engine's 400 (tursi.engine.constraints). The sizes bound
what one request can make the engine compile, under the body cap (TURSI_MAX_BODY_BYTES).
A grammar is passed on as written: telling GBNF from Lark and converting it costs time that
grows with the grammar, which the engine spends off the request's event loop.
"""

from __future__ import annotations

import json
from typing import Any

from marshmallow import ValidationError, fields, post_load, validate, validates_schema

from ..engine.constraints import (  # the engine's bounds, checked here with the request
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    MAX_GRAMMAR_CHARS,
    MAX_REGEX_CHARS,
    MAX_SCHEMA_CHARS,
)
from ..engine.jobs import Constraint
from .schema_base import JsonBoolean, StrictSchema

MAX_SCHEMA_DEPTH = 64  # objects and arrays nested in a JSON schema
MAX_CHOICE_ITEMS = MAX_CHOICES

# structured_outputs' keys -> the Constraint kind each asks for.
KINDS = {
    "json": "json_schema",
    "json_object": "json_object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}
# vLLM's older /v1 fields -> the structured_outputs key each stands for.
GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class JsonSchemaText(fields.Field):
    """A JSON schema: an object, or a string holding one (vLLM takes both). Loads as its
    compact JSON text (no spaces), the Constraint's value, so that equal schemas are one
    compiled grammar. The keys keep their order: the order of `properties` is the order in
    which the output writes them (a model asked for "reasoning" before "answer" writes it
    first), so sorting them would change the answer."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        if isinstance(value, str):
            value = _parse(value)
        if not isinstance(value, dict):
            raise ValidationError("must be a JSON schema: an object, or a string holding one")
        if _too_deep(value):
            raise ValidationError(f"nests objects and arrays over {MAX_SCHEMA_DEPTH} deep")
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        if len(text) > MAX_SCHEMA_CHARS:
            raise ValidationError(
                f"is {len(text)} characters as compact JSON; at most {MAX_SCHEMA_CHARS}"
            )
        return text


def _parse(text: str) -> Any:
    """A schema sent as a string: JSON only (no NaN or Infinity, as load_body refuses)."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except RecursionError:
        raise ValidationError("is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, an integer of over 4300 digits
        raise ValidationError(f"is not valid JSON: {exc}") from None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_SCHEMA_DEPTH:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return False


# One field per kind, shared by structured_outputs and /v1's guided_* fields.
def json_schema_field(**kwargs: Any) -> fields.Field:
    return JsonSchemaText(
        metadata={"description": "a JSON schema, or a string holding one"}, **kwargs
    )


def regex_field(**kwargs: Any) -> fields.Field:
    return fields.String(
        validate=validate.Length(min=1, max=MAX_REGEX_CHARS),
        metadata={"description": "a regular expression the whole output matches"},
        **kwargs,
    )


def choice_field(**kwargs: Any) -> fields.Field:
    return fields.List(
        fields.String(validate=validate.Length(min=1, max=MAX_CHOICE_CHARS)),
        validate=validate.Length(min=1, max=MAX_CHOICE_ITEMS),
        metadata={"description": "the output is exactly one of these strings"},
        **kwargs,
    )


def grammar_field(**kwargs: Any) -> fields.Field:
    return fields.String(
        validate=validate.Length(min=1, max=MAX_GRAMMAR_CHARS),
        metadata={"description": "a grammar the output follows: Lark (llguidance's) or GBNF"},
        **kwargs,
    )


def constraint(key: str, value: Any) -> Constraint:
    """The Constraint of one structured_outputs key and its loaded value."""
    if key == "json_object":
        return Constraint("json_object")
    return Constraint(KINDS[key], value)


class StructuredOutputsSchema(StrictSchema):
    """`structured_outputs`: exactly one way to constrain the output; loads as a Constraint."""

    json = json_schema_field()
    json_object = JsonBoolean(
        validate=validate.Equal(True, error="must be true (leave it out for no constraint)"),
        metadata={"description": "true: the output is a JSON object"},
    )
    regex = regex_field()
    choice = choice_field()
    grammar = grammar_field()

    @validates_schema
    def _exactly_one(self, data: dict[str, Any], **_: Any) -> None:
        given = [key for key in KINDS if key in data]
        if len(given) != 1:
            both = f": {given[0]} and {given[1]} are both given" if given else ""
            raise ValidationError(
                f"give exactly one of {', '.join(KINDS)}{both}", given[1] if given else "_schema"
            )

    @post_load
    def _constraint(self, data: dict[str, Any], **_: Any) -> Constraint:
        ((key, value),) = data.items()
        return constraint(key, value)


class JsonSchemaFormatSchema(StrictSchema):
    """OpenAI's response_format.json_schema. `name` and `description` tell OpenAI's models
    what the format is for; these models are not told (the constraint is what holds them to
    it). `strict` is accepted either way: the schema is always enforced."""

    name = fields.String(required=True, validate=validate.Length(min=1, max=256))
    description = fields.String(validate=validate.Length(max=MAX_SCHEMA_CHARS))
    schema = json_schema_field()
    strict = JsonBoolean()


class ResponseFormatSchema(StrictSchema):
    """OpenAI's response_format; loads as a Constraint, or None for `text`. A json_schema
    without `schema` asks for a JSON object, as json_object does."""

    type = fields.String(required=True, validate=validate.OneOf(RESPONSE_FORMATS))
    json_schema = fields.Nested(JsonSchemaFormatSchema, load_default=None)

    @validates_schema
    def _schema_with_its_type(self, data: dict[str, Any], **_: Any) -> None:
        if (data["type"] == "json_schema") != (data["json_schema"] is not None):
            raise ValidationError('needed with type "json_schema", and only with it', "json_schema")

    @post_load
    def _constraint(self, data: dict[str, Any], **_: Any) -> Constraint | None:
        if data["type"] == "text":
            return None
        schema = (data["json_schema"] or {}).get("schema")
        return Constraint("json_object") if schema is None else Constraint("json_schema", schema)


# The loaded /v1 data's attributes that ask for structured output, and their request keys.
SOURCES = {
    "constraint": "structured_outputs",
    "response_format": "response_format",
    **{name: name for name in GUIDED},
}


def check_one_source(data: dict[str, Any]) -> None:
    """A /v1 request asks for structured output one way at most (400 naming the second)."""
    given = [key for attr, key in SOURCES.items() if data.get(attr) is not None]
    if len(given) > 1:
        raise ValidationError(
            f"{given[0]} already asks for structured output: give one of "
            f"{', '.join(SOURCES.values())}",
            given[1],
        )


def pop_constraint(data: dict[str, Any]) -> Constraint | None:
    """Replace /v1's loaded response_format and guided_* by the one `constraint` they ask
    for (or structured_outputs' own; check_one_source ran)."""
    found = [data.get("constraint"), data.pop("response_format", None)]
    found += [constraint(key, data.pop(name)) for name, key in GUIDED.items() if name in data]
    return next((given for given in found if given is not None), None)
