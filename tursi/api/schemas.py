"""Marshmallow schemas for every request body and query. Unknown fields are rejected (400);
`null` for an optional field means its default (StrictSchema)."""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError, fields, validate, validates_schema

from ..engine.catalog import DTYPES, QUANT_BITS, QUANT_MODES
from .schema_base import (  # noqa: F401 (re-exported)
    BoundedDict,
    BoundedList,
    JsonBoolean,
    JsonInteger,
    JsonNumber,
    StrictSchema,
)
from .structured_schemas import StructuredOutputsSchema

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_PROMPT_CHARS = 200_000
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs bound)
MAX_CHOICES = 16  # n, best_of
INT64 = (-(2**63), 2**63 - 1)


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


def temperature_field(default: float) -> fields.Field:
    return JsonNumber(validate=validate.Range(min=0.0, max=2.0), load_default=default)


def top_p_field(default: float) -> fields.Field:
    return JsonNumber(
        validate=validate.Range(min=0.0, max=1.0, min_inclusive=False), load_default=default
    )


def stop_string_field() -> fields.Field:
    return fields.String(validate=validate.Length(min=1, max=MAX_STOP_LENGTH))


def max_tokens_field() -> fields.Field:
    return JsonInteger(validate=validate.Range(min=1), load_default=None)


def cache_prompt_field() -> fields.Field:
    """`cache_prompt` (llama.cpp's name): false keeps this request's prompt out of the
    prefix cache, which then neither serves it nor keeps it (GenerationJob.cache_prompt).
    Not a sampling parameter: the output is the same either way, only the time differs."""
    return JsonBoolean(
        load_default=True,
        metadata={"description": "false: the prefix cache neither serves nor keeps the prompt"},
    )


def choices_field(most: int = MAX_CHOICES, **kwargs: Any) -> fields.Field:
    """`n`: choices per prompt, each its own row of the batch, all from one prefill."""
    return JsonInteger(validate=validate.Range(min=1, max=most, **kwargs), load_default=1)


def logprobs_field(top: int) -> fields.Field:
    """None: no logprobs; k: each token's logprob and its k most likely alternatives."""
    return JsonInteger(validate=validate.Range(min=0, max=top), load_default=None)


def token_id_field() -> fields.Field:
    """A token id; ids past the model's vocabulary are refused where the model is known."""
    return JsonInteger(validate=validate.Range(min=0, max=INT64[1]))


def token_ids_field(min_items: int, max_items: int, **kwargs: Any) -> fields.Field:
    return TokenIds(
        token_id_field(), validate=validate.Length(min=min_items, max=max_items), **kwargs
    )


class TokenIds(BoundedList):
    """A list of token ids. A prompt of token ids can be 200,000 long: when every item is a
    JSON integer in range (the usual case) it is checked by built-ins in one pass, not by
    one field load per id; otherwise each id is loaded, for the errors that name it."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> list[int]:
        self.check_length(value)
        if isinstance(value, list) and all(type(item) is int for item in value):
            if not value or (min(value) >= 0 and max(value) <= INT64[1]):
                return list(value)
        return super()._deserialize(value, attr, data, **kwargs)


class LogitBias(fields.Field):
    """OpenAI's logit_bias: an object from token ids to a bias added to their logits. JSON
    keys are strings, so "50256" is token 50256 (an int key from a Python caller too);
    loads as {token id: bias}."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> dict[int, float]:
        if not isinstance(value, dict):
            raise ValidationError("must be an object of token ids to biases")
        if len(value) > MAX_LOGIT_BIAS:
            raise ValidationError(f"at most {MAX_LOGIT_BIAS} entries")
        bias = JsonNumber(validate=validate.Range(min=-100.0, max=100.0))
        loaded: dict[int, float] = {}
        for key, number in value.items():
            token = _token_key(key)
            if token is None:
                raise ValidationError(f"key {key!r} is not a token id (an integer >= 0)")
            try:
                loaded[token] = bias.deserialize(number)
            except ValidationError as exc:
                raise ValidationError({str(key): exc.messages}) from None
        return loaded


def _token_key(key: Any) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        token = key
    elif isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 19:
        token = int(key)
    else:
        return None
    return token if 0 <= token <= INT64[1] else None


class SamplingSchema(StrictSchema):
    """The sampling parameters, one field per tursi.engine.jobs.SamplingParams field, with
    the engine's meaning (the request keys are that dataclass's field names:
    tursi.api.jobs.sampling_params). Both APIs' request schemas derive from it; the OpenAI
    ones override the defaults they differ on and map OpenAI's logprobs fields onto these."""

    temperature = temperature_field(0.7)
    top_p = top_p_field(0.9)
    top_k = JsonInteger(validate=validate.Range(min=0, max=1_000_000), load_default=0)  # 0: none
    # 0: none; else drop the tokens less likely than min_p times the most likely one.
    min_p = JsonNumber(validate=validate.Range(min=0.0, max=1.0), load_default=0.0)
    # 1 means none; above 1 discourages tokens already in the prompt or the output.
    repetition_penalty = JsonNumber(
        validate=validate.Range(min=0.0, max=10.0, min_inclusive=False), load_default=1.0
    )
    presence_penalty = JsonNumber(validate=validate.Range(min=-2.0, max=2.0), load_default=0.0)
    frequency_penalty = JsonNumber(validate=validate.Range(min=-2.0, max=2.0), load_default=0.0)
    logit_bias = LogitBias(load_default=dict)
    stop = BoundedList(
        stop_string_field(), validate=validate.Length(max=MAX_STOP_STRINGS), load_default=list
    )
    stop_token_ids = token_ids_field(0, MAX_STOP_TOKEN_IDS, load_default=list)
    seed = JsonInteger(validate=validate.Range(min=INT64[0], max=INT64[1]), load_default=None)
    ignore_eos = JsonBoolean(load_default=False)  # as vLLM: keep going past end of sequence
    # Speculative decoding (n-gram drafts) when the server has it on; false opts this
    # request out. The output is the same either way (docs/performance.md).
    speculative = JsonBoolean(load_default=True)
    logprobs = logprobs_field(MAX_LOGPROBS)
    prompt_logprobs = logprobs_field(MAX_LOGPROBS)  # the prompt's tokens (entry 0: null)
    # Structured output (vLLM's name): a JSON schema, any JSON object, a regex, a choice
    # list or a grammar, loaded as a tursi.engine.jobs.Constraint (tursi.api.structured_schemas).
    constraint = fields.Nested(
        StructuredOutputsSchema,
        data_key="structured_outputs",
        load_default=None,
        metadata={"description": "constrain the output: a JSON schema, regex, choice..."},
    )


class GenerateRequestSchema(SamplingSchema):
    model = model_field()
    prompt = fields.String(required=True, validate=validate.Length(min=1, max=MAX_PROMPT_CHARS))
    max_tokens = max_tokens_field()
    # One text per answer keeps the native body and stream as they are; several choices
    # are what /v1/completions is for.
    n = choices_field(1, error="must be 1 on /api/v1/generate (use /v1/completions for more)")
    stream = JsonBoolean(load_default=False)
    return_full_text = JsonBoolean(load_default=True)
    cache_prompt = cache_prompt_field()


class EmptyQuerySchema(StrictSchema):
    """Endpoints that take no query parameters."""


class UnloadRequestSchema(StrictSchema):
    """Unload takes no fields: no body, or an empty object."""
