"""Marshmallow schemas of the response bodies, for the OpenAPI document (tursi.api.openapi).

The views build their bodies as dicts; these schemas describe them (apispec turns them into
JSON Schema, with `additionalProperties: false`) and tests/test_openapi.py checks real
responses against them. `required` marks the fields that are always present.
"""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from ..engine.catalog import QUANT_BITS, QUANT_MODES

# Every error `code`, and when it is sent (statuses: docs/api.md#errors); gunicorn's own
# (tursi.api.gunicorn_errors.CODES) included.
ERROR_CODES = {
    "invalid_request": "the body is not a JSON object (or not sent as application/json), a "
    "field is invalid or unknown, max_tokens is above the server's limit, "
    "or a query string was sent to a route that takes none",
    "context_length_exceeded": "prompt tokens + max_tokens exceed the model's context",
    "unsupported_quantization": "this device's backend cannot run the asked bits/mode",
    "unauthorized": "missing or wrong API key",
    "model_not_found": "the model name is not in the catalog",
    "not_found": "no such route",
    "method_not_allowed": "the route does not take this method (see the Allow header)",
    "model_not_loaded": "the model is not loaded",
    "load_in_progress": "the model is loading: unload it once it is loaded",
    "model_conflict": "the model is loaded or loading with other settings; unload it first",
    "payload_too_large": "the body is larger than TURSI_MAX_BODY_BYTES",
    "request_body_timeout": "the body did not arrive within TURSI_BODY_TIMEOUT seconds; the "
    "connection closes",
    "rate_limit_exceeded": "over the rate limit (see Retry-After)",
    "token_rate_limit_exceeded": "the token budget left (TURSI_TOKEN_RATE_LIMIT) does not "
    "cover the prompt tokens + max_tokens x choices (see Retry-After)",
    "request_exceeds_token_limit": "the request needs more tokens than a whole window of the "
    "token budget allows (TURSI_TOKEN_RATE_LIMIT): no wait helps",
    "generation_failed": "the model raised during generation",
    "internal_error": "an unexpected failure (logged server-side)",
    "model_loading": "the model is still loading (see Retry-After)",
    "model_unloaded": "the model was unloaded while the request waited or ran",
    "model_failed": "the model's engine stopped (its thread crashed, or a step ran past "
    "TURSI_STEP_TIMEOUT) while the request waited or ran; the model shows failed",
    "overloaded": "the model's batch and queue are full (see Retry-After)",
    "not_ready": "the preloaded models are not all loaded: not yet, or one failed (see "
    "Retry-After)",
    "shutting_down": "the server is shutting down: retry on another instance (see Retry-After)",
    "insufficient_memory": "the model does not fit the memory budget (TURSI_MAX_MEMORY) even "
    "after unloading every idle, unpinned model",
    "request_timeout": "the request ran longer than TURSI_REQUEST_TIMEOUT",
    "client_disconnected": "the client closed the connection before its answer was ready; "
    "never received, it shows in logs and metrics as 499",
    "send_timeout": "a stream's client stopped reading for TURSI_SEND_TIMEOUT seconds: the "
    "generation ended and the connection closed; never received, it shows in metrics",
    "forbidden": "(from gunicorn, before the app) a PROXY protocol header from an address "
    "that is not an allowed proxy, or a TLS error",
    "uri_too_long": "(from gunicorn, before the app) a request line over 4094 bytes",
    "expectation_failed": "(from gunicorn, before the app) an Expect header other than "
    "100-continue",
    "headers_too_large": "(from gunicorn, before the app) a header over 8190 bytes or more "
    "than 100 headers",
    "not_implemented": "(from gunicorn, before the app) a Transfer-Encoding it does not support",
    "http_error": "any other HTTP error",
}

MODEL_STATUSES = ("not_loaded", "loading", "loaded", "failed")
FINISH_REASONS = ("stop", "length")
CHAT_FINISH_REASONS = (*FINISH_REASONS, "tool_calls")  # a chat that offered tools


def _text(**kwargs) -> fields.Field:
    return fields.String(required=True, **kwargs)


def _count(**kwargs) -> fields.Field:
    return fields.Integer(required=True, validate=validate.Range(min=0), **kwargs)


def _one_of(values, **kwargs) -> fields.Field:
    return fields.String(required=True, validate=validate.OneOf(values), **kwargs)


def _always_null() -> fields.Field:
    return fields.Raw(
        required=True,
        allow_none=True,
        metadata={"type": "object", "enum": [None], "description": "always null"},
    )


# --- errors ------------------------------------------------------------------------------


class ErrorDetailSchema(Schema):
    code = _one_of(tuple(ERROR_CODES), metadata={"description": "stable, machine-readable"})
    message = _text()
    details = fields.Dict(required=True, metadata={"description": "depends on the code"})


class ErrorSchema(Schema):
    """The error body of /api/v1 and every route outside /v1."""

    error = fields.Nested(ErrorDetailSchema, required=True)


class OpenAIErrorDetailSchema(Schema):
    message = _text()
    type = _one_of(
        (
            "invalid_request_error",
            "authentication_error",
            "permission_error",
            "rate_limit_error",
            "server_error",
        )
    )
    param = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "the first invalid field, else null"},
    )
    code = _one_of(tuple(ERROR_CODES))
    details = fields.Dict(required=True)


class OpenAIErrorSchema(Schema):
    """OpenAI's error object, on /v1; `code` and `details` as on /api/v1."""

    error = fields.Nested(OpenAIErrorDetailSchema, required=True)


# --- /api/v1/models ----------------------------------------------------------------------


class WorkerStatusSchema(Schema):
    pid = _count(metadata={"description": "the gunicorn worker's process id"})
    status = _one_of(MODEL_STATUSES, metadata={"description": "the model on this worker"})
    memory_bytes = fields.Integer(
        required=True,
        allow_none=True,
        validate=validate.Range(min=0),
        metadata={"description": "this worker's copy, while loaded"},
    )


class ModelViewSchema(Schema):
    """One catalog model, as the whole server holds it. Loaded models add quantized ..
    uptime; loading ones progress and stage (once the load reports them); failed ones the load
    error. Under gunicorn (a run folder), `workers` says where each worker's copy stands."""

    name = _text()
    status = _one_of(MODEL_STATUSES)
    quantized = fields.Boolean()
    bits = fields.Integer(allow_none=True, validate=validate.OneOf(QUANT_BITS))
    mode = fields.String(allow_none=True, validate=validate.OneOf(QUANT_MODES))
    dtype = fields.String(metadata={"description": "compute dtype, e.g. float32"})
    device = fields.String(metadata={"description": "device of the input embeddings"})
    memory_usage = fields.String(metadata={"example": "311MB"})
    memory_bytes = fields.Integer(validate=validate.Range(min=0))
    uptime = fields.String(metadata={"example": "2h 30m"})
    progress = fields.Float(validate=validate.Range(min=0, max=1))
    stage = fields.String(metadata={"example": "loading weights"})
    error = fields.String(metadata={"description": "why the load failed"})
    workers = fields.List(
        fields.Nested(WorkerStatusSchema),
        metadata={"description": "one entry per live worker (gunicorn); memory sums them"},
    )


class ModelListSchema(Schema):
    models = fields.List(fields.Nested(ModelViewSchema), required=True)


class LoadResponseSchema(Schema):
    status = _one_of(("loading", "loaded"))
    message = _text()
    estimated_time = fields.String(
        metadata={"description": "only when a load starts", "example": "30s"}
    )


class UnloadResponseSchema(Schema):
    status = _one_of(("success",))
    message = _text()


class PrefixCacheMetricsSchema(Schema):
    """The prefix cache since the server started (summed over workers): prompt tokens looked
    up in it, those it served, their ratio, the memory it holds now and blocks evicted."""

    prompt_tokens = _count(metadata={"description": "requests with cache_prompt false excluded"})
    cached_tokens = _count()
    hit_rate = _text(metadata={"example": "62.5%", "description": "cached / prompt tokens"})
    bytes = _count(metadata={"description": "held now; 0 when not loaded"})
    evictions = _count(metadata={"description": "blocks evicted to make room"})


class SpeculativeMetricsSchema(Schema):
    """Speculative decoding since the server started (summed over workers): drafted tokens
    the model verified, those kept, their ratio."""

    drafted_tokens = _count()
    accepted_tokens = _count()
    acceptance_rate = _text(metadata={"example": "71.0%", "description": "accepted / drafted"})


class KVCacheMetricsSchema(Schema):
    """The running batch's KV cache now (summed over workers): the most it may hold
    (TURSI_KV_CACHE, or what the model can use), what is allocated, what its rows fill."""

    budget_bytes = _count(metadata={"description": "0 when not loaded"})
    reserved_bytes = _count(metadata={"description": "allocated for the running batch"})
    used_bytes = _count(metadata={"description": "the running rows' tokens"})


class ModelMetricsValuesSchema(Schema):
    requests_total = _count()
    tokens_generated = _count()
    average_generation_time = _text(metadata={"example": "1.5s"})
    memory_usage = fields.String(required=True, allow_none=True)
    load_time = fields.String(
        required=True, allow_none=True, metadata={"example": "2026-11-25T12:00:00Z"}
    )
    error_rate = _text(metadata={"example": "0.1%"})
    status = _one_of(MODEL_STATUSES)
    load_duration = fields.String(required=True, allow_none=True)
    generations_running = _count()
    generations_waiting = _count()
    prefix_cache = fields.Nested(PrefixCacheMetricsSchema, required=True)
    speculative = fields.Nested(SpeculativeMetricsSchema, required=True)
    kv_cache = fields.Nested(KVCacheMetricsSchema, required=True)
    quantized = fields.Boolean(required=True, allow_none=True)
    bits = fields.Integer(required=True, allow_none=True, validate=validate.OneOf(QUANT_BITS))
    mode = fields.String(required=True, allow_none=True, validate=validate.OneOf(QUANT_MODES))
    dtype = fields.String(required=True, allow_none=True)
    memory_bytes = fields.Integer(required=True, allow_none=True)


class ModelMetricsSchema(Schema):
    name = _text()
    metrics = fields.Nested(ModelMetricsValuesSchema, required=True)


# --- /api/v1/generate --------------------------------------------------------------------


class NativeTopLogprobSchema(Schema):
    """A token and its log probability under the model's raw distribution (log-softmax of
    its logits, before temperature, penalties and the other filters)."""

    token = _text(metadata={"description": "the token's text"})
    token_id = _count()
    logprob = fields.Float(required=True)
    bytes = fields.List(
        fields.Integer(validate=validate.Range(min=0, max=255)),
        required=True,
        metadata={"description": "the token's UTF-8 bytes (a token may hold part of a character)"},
    )


class NativeTokenLogprobSchema(NativeTopLogprobSchema):
    top_logprobs = fields.List(
        fields.Nested(NativeTopLogprobSchema),
        required=True,
        metadata={"description": "the `logprobs` most likely tokens at this position, best first"},
    )


def _native_logprobs(description: str) -> fields.Field:
    return fields.List(
        fields.Nested(NativeTokenLogprobSchema), metadata={"description": description}
    )


def _native_prompt_logprobs() -> fields.Field:
    return fields.List(
        fields.Nested(NativeTokenLogprobSchema, allow_none=True),
        metadata={"description": "one per prompt token; the first is null (nothing precedes it)"},
    )


class GenerateDoneSchema(Schema):
    """The end of a generation; also the data of the stream's `event: done`."""

    tokens_generated = _count()
    generation_time = _text(metadata={"example": "1.2s"})
    finish_reason = _one_of(FINISH_REASONS)
    cached_tokens = _count(
        metadata={"description": "prompt tokens whose KV came from the prefix cache"}
    )


class GenerateResponseSchema(GenerateDoneSchema):
    text = _text()
    logprobs = _native_logprobs("with `logprobs`: one per generated token")
    prompt_logprobs = _native_prompt_logprobs()


class GenerateTextEventSchema(Schema):
    """The data of the stream's `event: text`."""

    text = _text()
    finished = fields.Boolean(required=True, validate=validate.Equal(False))
    logprobs = _native_logprobs("with `logprobs`: the tokens whose text this chunk completes")


class GeneratePromptLogprobsEventSchema(Schema):
    """The data of the stream's `event: prompt_logprobs` (with `prompt_logprobs`), once,
    before the generated text."""

    prompt_logprobs = _native_prompt_logprobs()


# --- /api/v1/status, /health, /ready -----------------------------------------------------


class MemorySchema(Schema):
    total = _text(metadata={"example": "24GB"})
    used = _text()
    free = _text()


class ProcessMemorySchema(Schema):
    rss = _text(metadata={"example": "540MB"})
    rss_bytes = _count(metadata={"description": "resident memory of the server's workers, summed"})


class GpuMemorySchema(MemorySchema):
    utilization = fields.String(required=True, allow_none=True, metadata={"example": "60%"})


class RequestCountsSchema(Schema):
    total = _count()
    success = _count()
    failed = _count()
    rate = _text(metadata={"example": "10/minute"})


class GenerationCountsSchema(Schema):
    running = _count()
    waiting = _count()


class StatusSchema(Schema):
    status = _one_of(("healthy",))
    uptime = _text()
    active_models = _count()
    memory_usage = fields.Nested(MemorySchema, required=True)
    process_memory = fields.Nested(ProcessMemorySchema, required=True)
    gpu_usage = fields.Nested(
        GpuMemorySchema,
        required=True,
        allow_none=True,
        metadata={"description": "null without a GPU"},
    )
    requests = fields.Nested(RequestCountsSchema, required=True)
    generations = fields.Nested(GenerationCountsSchema, required=True)


class HistorySampleSchema(Schema):
    """The whole server at one moment (tursi.api.history)."""

    time = fields.Float(required=True, metadata={"description": "Unix time, seconds"})
    requests_per_second = fields.Float(
        required=True, allow_none=True, metadata={"description": "null in the first sample"}
    )
    tokens_per_second = fields.Float(
        required=True,
        allow_none=True,
        metadata={"description": "tokens of the generations that ended in the interval"},
    )
    running = _count()
    waiting = _count()
    process_memory_bytes = _count(metadata={"description": "the workers' resident memory"})
    memory_used_bytes = _count(metadata={"description": "the machine's memory in use"})
    gpu_memory_used_bytes = fields.Integer(
        required=True, allow_none=True, metadata={"description": "null without a GPU"}
    )
    gpu_utilization = fields.Float(
        required=True, allow_none=True, metadata={"description": "0..1; null without a GPU"}
    )


class HistorySchema(Schema):
    interval_seconds = fields.Float(required=True)
    samples = fields.List(
        fields.Nested(HistorySampleSchema),
        required=True,
        metadata={"description": "oldest first; the last five minutes at most"},
    )


class HealthSchema(Schema):
    status = _one_of(("ok",))


class ReadySchema(Schema):
    status = _one_of(("ready",))
    models = fields.Dict(
        keys=fields.String(),
        values=fields.String(validate=validate.OneOf(MODEL_STATUSES)),
        required=True,
        metadata={"description": "each TURSI_PRELOAD model's status"},
    )


# --- /v1 (OpenAI-compatible) -------------------------------------------------------------


class OpenAIModelSchema(Schema):
    id = _text()
    object = _one_of(("model",))
    created = _count()
    owned_by = _one_of(("tursi",))


class OpenAIModelListSchema(Schema):
    object = _one_of(("list",))
    data = fields.List(fields.Nested(OpenAIModelSchema), required=True)


class PromptTokensDetailsSchema(Schema):
    cached_tokens = _count(
        metadata={"description": "prompt tokens whose KV came from the prefix cache"}
    )


class UsageSchema(Schema):
    prompt_tokens = _count()
    completion_tokens = _count()
    total_tokens = _count()
    prompt_tokens_details = fields.Nested(PromptTokensDetailsSchema, required=True)


class TopLogprobSchema(Schema):
    token = _text()
    logprob = fields.Float(required=True)
    bytes = fields.List(
        fields.Integer(validate=validate.Range(min=0, max=255)), required=True, allow_none=True
    )


class ChatTokenLogprobSchema(TopLogprobSchema):
    top_logprobs = fields.List(fields.Nested(TopLogprobSchema), required=True)


class ChatLogprobsSchema(Schema):
    """With `logprobs: true`: the tokens of the message (or of the delta), each with its
    `top_logprobs` most likely alternatives; raw log-softmax of the model's logits."""

    content = fields.List(fields.Nested(ChatTokenLogprobSchema), required=True, allow_none=True)
    refusal = _always_null()


class CompletionLogprobsSchema(Schema):
    """With `logprobs: k`: four lists over the tokens of the text (the prompt's first with
    echo, its first entry null): their text, logprob, up to k + 1 alternatives (the k most
    likely and the chosen token) and where each starts in the text."""

    tokens = fields.List(fields.String(), required=True)
    token_logprobs = fields.List(fields.Float(allow_none=True), required=True)
    top_logprobs = fields.List(
        fields.Dict(keys=fields.String(), values=fields.Float(), allow_none=True), required=True
    )
    text_offset = fields.List(fields.Integer(validate=validate.Range(min=0)), required=True)


def _logprobs(schema: type[Schema]) -> fields.Field:
    return fields.Nested(
        schema, required=True, allow_none=True, metadata={"description": "null unless asked"}
    )


class CompletionChoiceSchema(Schema):
    index = _count(metadata={"description": "prompt i's choices are i*n .. i*n+n-1"})
    text = _text()
    finish_reason = _one_of(FINISH_REASONS)
    logprobs = _logprobs(CompletionLogprobsSchema)


class CompletionSchema(Schema):
    id = _text()
    object = _one_of(("text_completion",))
    created = _count()
    model = _text()
    choices = fields.List(fields.Nested(CompletionChoiceSchema), required=True)
    usage = fields.Nested(UsageSchema, required=True)


class ChatCalledFunctionSchema(Schema):
    name = _text()
    arguments = _text(metadata={"description": "a JSON object, as text"})


class ChatToolCallSchema(Schema):
    id = _text()
    type = _one_of(("function",))
    function = fields.Nested(ChatCalledFunctionSchema, required=True)


class ChatMessageSchema(Schema):
    role = _one_of(("assistant",))
    content = fields.String(
        required=True, allow_none=True, metadata={"description": "null when the answer is calls"}
    )
    refusal = _always_null()
    tool_calls = fields.List(
        fields.Nested(ChatToolCallSchema),
        metadata={"description": "the calls the model made (docs/tools.md); absent if none"},
    )


class ChatChoiceSchema(Schema):
    index = _count()
    message = fields.Nested(ChatMessageSchema, required=True)
    finish_reason = _one_of(CHAT_FINISH_REASONS)
    logprobs = _logprobs(ChatLogprobsSchema)


class ChatCompletionSchema(Schema):
    id = _text()
    object = _one_of(("chat.completion",))
    created = _count()
    model = _text()
    choices = fields.List(fields.Nested(ChatChoiceSchema), required=True)
    usage = fields.Nested(UsageSchema, required=True)


class CompletionChunkChoiceSchema(Schema):
    index = _count()
    text = _text()
    finish_reason = fields.String(
        required=True, allow_none=True, validate=validate.OneOf(FINISH_REASONS)
    )
    logprobs = _logprobs(CompletionLogprobsSchema)


class CompletionChunkSchema(Schema):
    """One `data:` frame of a streamed /v1/completions (the last has the finish_reason; with
    stream_options.include_usage one more has no choices and the usage)."""

    id = _text()
    object = _one_of(("text_completion",))
    created = _count()
    model = _text()
    choices = fields.List(fields.Nested(CompletionChunkChoiceSchema), required=True)
    usage = fields.Nested(UsageSchema)


class ChatToolCallDeltaSchema(ChatToolCallSchema):
    index = _count(metadata={"description": "the call's place in the message's tool_calls"})


class ChatDeltaSchema(Schema):
    role = fields.String(
        validate=validate.OneOf(("assistant",)), metadata={"description": "in the first chunk only"}
    )
    content = fields.String()
    tool_calls = fields.List(
        fields.Nested(ChatToolCallDeltaSchema),
        metadata={"description": "each call whole, in one chunk, once the model has written it"},
    )


class ChatChunkChoiceSchema(Schema):
    index = _count()
    delta = fields.Nested(ChatDeltaSchema, required=True)
    finish_reason = fields.String(
        required=True, allow_none=True, validate=validate.OneOf(CHAT_FINISH_REASONS)
    )
    logprobs = _logprobs(ChatLogprobsSchema)


class ChatCompletionChunkSchema(Schema):
    """One `data:` frame of a streamed /v1/chat/completions."""

    id = _text()
    object = _one_of(("chat.completion.chunk",))
    created = _count()
    model = _text()
    choices = fields.List(fields.Nested(ChatChunkChoiceSchema), required=True)
    usage = fields.Nested(UsageSchema)


# --- tokenizer routes (/api/v1/tokenize, /tokenize, ...) ---------------------------------


class TokenizeResponseSchema(Schema):
    tokens = fields.List(fields.Integer(validate=validate.Range(min=0)), required=True)
    count = _count()
    context_length = _count(metadata={"description": "the model's context, prompt + output"})


class DetokenizeResponseSchema(Schema):
    text = _text()


class TokenPieceSchema(Schema):
    id = _count()
    piece = fields.Raw(
        required=True,
        metadata={
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
            ],
            "description": "the token's text, or its bytes when they are not UTF-8 alone",
        },
    )


class CompatTokenizeResponseSchema(Schema):
    """vLLM's answer (tokens, count, max_model_len); llama.cpp reads `tokens`."""

    tokens = fields.Raw(
        required=True,
        metadata={
            "type": "array",
            "items": {
                "anyOf": [
                    {"type": "integer", "minimum": 0},
                    {"$ref": "#/components/schemas/TokenPiece"},
                ]
            },
            "description": "token ids; with with_pieces, {id, piece} objects",
        },
    )
    count = _count()
    max_model_len = _count(metadata={"description": "the model's context length"})


class CompatDetokenizeResponseSchema(Schema):
    prompt = _text(metadata={"description": "the text (vLLM's name)"})
    content = _text(metadata={"description": "the same text (llama.cpp's name)"})
