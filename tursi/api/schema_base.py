"""The base of every request schema: StrictSchema (unknown fields refused, `null` is the
default), JSON's own scalar types, nothing coerced, and lists and objects whose length bound
is checked before their items. tursi.api.schemas re-exports them."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, fields, pre_load, validate


class StrictSchema(Schema):
    """Every request schema (nested ones too): unknown fields are refused, and `null` for an
    optional field means "its default", as OpenAI's clients mean it when they send null for
    fields the caller did not set. One rule for every field, not a per-field allow_none: a
    null is dropped before loading, so the field loads its default (or stays absent)."""

    class Meta:
        unknown = RAISE

    @pre_load
    def _null_is_default(self, data: Any, **_: Any) -> Any:
        if not isinstance(data, dict):
            return data  # marshmallow refuses it ("Invalid input type")
        optional = {
            field.data_key or name for name, field in self.fields.items() if not field.required
        }
        return {
            key: value for key, value in data.items() if value is not None or key not in optional
        }


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


class _LengthFirst:
    """A collection whose length bound (a validate.Length among its validators) is checked
    before its items are loaded: marshmallow loads every item first and validates after, so
    a 1 MB body's 200,000-item list would cost 200,000 item loads only to be refused."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> Any:
        self.check_length(value)
        return super()._deserialize(value, attr, data, **kwargs)  # type: ignore[misc]

    def check_length(self, value: Any) -> None:
        if isinstance(value, (list, dict)):
            for validator in self.validators:  # type: ignore[attr-defined]
                if isinstance(validator, validate.Length):
                    validator(value)


class BoundedList(_LengthFirst, fields.List):
    """fields.List, its length checked before its items (every list of a request schema)."""


class BoundedDict(_LengthFirst, fields.Dict):
    """fields.Dict, its length checked before its entries."""
