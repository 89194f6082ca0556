"""The OpenAPI 3 document (GET /api/v1/openapi.json) and Swagger UI over it (GET /docs).

The document is built with apispec, once per app on first request, from the app's URL map:
every route except the Swagger UI pages (the app has no `static` route). Each view's docstring gives
the summary (first paragraph) and description; OPERATIONS below gives the request body, the
success responses and the route's error codes; request and response bodies are the
marshmallow schemas (tursi.api.schemas, tursi.api.openai_schemas, tursi.api.response_schemas).
Swagger UI's assets come from the installed flask-swagger-ui package: no CDN.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify
from flask_swagger_ui import get_swaggerui_blueprint
from marshmallow import fields as ma_fields
from marshmallow import validate

from .. import __version__
from ..engine.catalog import NAME_PATTERN
from . import no_query
from .auth import API_PREFIX, OPEN_PATHS, is_api_path, is_openai_path
from .openai_schemas import (
    MAX_PROMPT_TOKENS,
    MAX_PROMPTS,
    TOOL_CHOICES,
    ChatCompletionRequestSchema,
    CompletionRequestSchema,
    ContentPartSchema,
    MessageContent,
    NamedToolChoiceSchema,
    Prompts,
    TextOrList,
    ToolChoice,
)
from .response_schemas import (
    ERROR_CODES,
    ChatCompletionChunkSchema,
    ChatCompletionSchema,
    CompatDetokenizeResponseSchema,
    CompatTokenizeResponseSchema,
    CompletionChunkSchema,
    CompletionSchema,
    DetokenizeResponseSchema,
    ErrorSchema,
    GenerateDoneSchema,
    GeneratePromptLogprobsEventSchema,
    GenerateResponseSchema,
    GenerateTextEventSchema,
    HealthSchema,
    HistorySchema,
    LoadResponseSchema,
    ModelListSchema,
    ModelMetricsSchema,
    OpenAIErrorSchema,
    OpenAIModelListSchema,
    OpenAIModelSchema,
    ReadySchema,
    StatusSchema,
    TokenizeResponseSchema,
    TokenPieceSchema,
    UnloadResponseSchema,
)
from .schemas import (
    MAX_LOGIT_BIAS,
    MAX_PROMPT_CHARS,
    GenerateRequestSchema,
    LoadRequestSchema,
    LogitBias,
    StrictSchema,
    UnloadRequestSchema,
)
from .structured_schemas import JsonSchemaText, StructuredOutputsSchema
from .tokenize_schemas import (
    CompatDetokenizeRequestSchema,
    CompatTokenizeRequestSchema,
    DetokenizeRequestSchema,
    TokenizeRequestSchema,
)

log = logging.getLogger(__name__)

SPEC_PATH = "/openapi.json"  # under /api/v1
DOCS_URL = "/docs"
SWAGGER_UI = "swagger_ui"  # the blueprint of /docs and its assets
EXTENSION = "tursi.openapi"  # app.extensions key of the built document

bp = Blueprint("openapi", __name__)


@bp.get(SPEC_PATH)
def spec():
    """This OpenAPI 3 document.

    Generated from the server's routes and schemas; Swagger UI shows it at /docs."""
    no_query()
    return jsonify(openapi_document(current_app))


def init_app(app: Flask) -> None:
    app.register_blueprint(bp, url_prefix=API_PREFIX)
    # validatorUrl null: Swagger UI would otherwise fetch a badge from validator.swagger.io.
    app.register_blueprint(
        get_swaggerui_blueprint(
            DOCS_URL,
            API_PREFIX + SPEC_PATH,
            blueprint_name=SWAGGER_UI,
            config={"app_name": "Tursi API", "validatorUrl": None},
        )
    )


def openapi_document(app: Flask) -> dict[str, Any]:
    """The app's document, built on first use and kept in app.extensions."""
    document = app.extensions.get(EXTENSION)
    if document is None:
        document = app.extensions[EXTENSION] = build_document(app)
    return document


# --- what each route takes and answers --------------------------------------------------


@dataclass
class Doc:
    tag: str
    responses: dict[int, dict]  # success status -> OpenAPI response
    errors: dict[int, list[str]] = field(default_factory=dict)  # error status -> codes
    body: Any = None  # request body schema (a marshmallow schema or a JSON schema)
    body_required: bool = True
    example: dict[str, Any] | None = None  # request body example
    security: list[dict] | None = None  # None: the global bearerAuth


def ok(description: str, schema: Any, media_type: str = "application/json") -> dict:
    return {"description": description, "content": {media_type: {"schema": schema}}}


# One server-sent event as the OpenAPI 3.2 SSE model describes it (and schemathesis checks
# each one): its `data` text, its `event` name when it has one. The frames' JSON is in the
# description, per API.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}


def with_stream(response: dict, description: str, example: str) -> dict:
    """A 200 that is JSON, or server-sent events when the request asks `stream: true`."""
    stream = {"schema": {**SSE_EVENT, "description": description}, "example": example}
    return {**response, "content": {**response["content"], "text/event-stream": stream}}


NATIVE_STREAM = (
    "`event: text` frames (data: GenerateTextEvent; with return_full_text the first is the "
    "prompt), with `prompt_logprobs` one `event: prompt_logprobs` frame (data: "
    "GeneratePromptLogprobsEvent) before the generated text, then exactly one `event: done` "
    "(data: GenerateDone) or `event: error` (data: Error); lines starting with `:` are "
    "keep-alive comments."
)
NATIVE_STREAM_EXAMPLE = (
    'event: text\ndata: {"text": "Once upon a time", "finished": false}\n\n'
    'event: text\ndata: {"text": ",", "finished": false}\n\n: keep-alive\n\n'
    'event: done\ndata: {"tokens_generated": 2, "generation_time": "0.05s", '
    '"finish_reason": "length"}\n\n'
)
OPENAI_STREAM = (
    "`data: {{chunk}}` frames ({kind}), the last with a finish_reason; with "
    "stream_options.include_usage one more chunk with no choices and the usage; then "
    '`data: [DONE]`. A failure after the start is one `data: {{"error": ...}}` frame '
    "(OpenAIError), then `data: [DONE]`. Lines starting with `:` are keep-alive comments."
)
OPENAI_STREAM_EXAMPLE = 'data: {"id": "chatcmpl-1", ...}\n\n: keep-alive\n\ndata: [DONE]\n\n'

QUERY = "invalid_request"  # the GET routes reject any query string (no parameters)
GENERATION_ERRORS = {
    400: ["invalid_request", "context_length_exceeded"],
    404: ["model_not_found"],
    409: ["model_not_loaded"],
    429: ["token_rate_limit_exceeded", "request_exceeds_token_limit"],
    500: ["generation_failed"],
    503: ["model_loading", "model_unloaded", "model_failed", "overloaded"],
    504: ["request_timeout"],
}
TOKENIZER_ERRORS = {
    400: ["invalid_request"],
    404: ["model_not_found"],
    409: ["model_not_loaded"],
    503: ["model_loading", "model_unloaded", "model_failed"],
}

# Endpoint -> Doc. Added to every operation: 401 unless open, 408 and 413 with a body, 429 on
# /api/v1 and /v1 (with the X-RateLimit-* headers on every response there), 500
# internal_error and, but on /health and /metrics, 503 shutting_down.
OPERATIONS: dict[str, Doc] = {
    "health.health": Doc(
        "health", {200: ok("The process answers HTTP", HealthSchema)}, {400: [QUERY]}, security=[]
    ),
    "health.ready": Doc(
        "health",
        {200: ok("Every preload model is loaded", ReadySchema)},
        {400: [QUERY], 503: ["not_ready"]},
    ),
    "models.list_models": Doc(
        "models", {200: ok("Every catalog model", ModelListSchema)}, {400: [QUERY]}
    ),
    "models.load_model": Doc(
        "models",
        {
            200: ok("Already loaded with these settings: nothing to do", LoadResponseSchema),
            202: ok(
                "The load started (or one with these settings is running); poll GET /api/v1/models",
                LoadResponseSchema,
            ),
        },
        {
            400: ["invalid_request", "unsupported_quantization"],
            404: ["model_not_found"],
            409: ["model_conflict"],
            507: ["insufficient_memory"],
        },
        body=LoadRequestSchema,
        body_required=False,
        example={"quantize": True, "bits": 8},
    ),
    "models.unload_model": Doc(
        "models",
        {200: ok("Unloaded; its memory is released", UnloadResponseSchema)},
        {
            400: ["invalid_request"],
            404: ["model_not_found"],
            409: ["model_not_loaded", "load_in_progress"],
        },
        body=UnloadRequestSchema,
        body_required=False,
    ),
    "models.model_metrics": Doc(
        "models",
        {200: ok("The model's counters", ModelMetricsSchema)},
        {400: [QUERY], 404: ["model_not_found"]},
    ),
    "generation.generate": Doc(
        "generation",
        {
            200: with_stream(
                ok("The generated text (`stream: false`)", GenerateResponseSchema),
                NATIVE_STREAM,
                NATIVE_STREAM_EXAMPLE,
            )
        },
        GENERATION_ERRORS,
        body=GenerateRequestSchema,
        example={"model": "smollm2-135m-instruct", "prompt": "Once upon a time", "max_tokens": 20},
    ),
    "status.server_status": Doc("status", {200: ok("Server status", StatusSchema)}, {400: [QUERY]}),
    "status.history": Doc(
        "status", {200: ok("The server's last minutes, for charts", HistorySchema)}, {400: [QUERY]}
    ),
    "openapi.spec": Doc(
        "docs", {200: ok("The OpenAPI document", {"type": "object"})}, {400: [QUERY]}
    ),
    "openai.list_models": Doc(
        "openai", {200: ok("The loaded models", OpenAIModelListSchema)}, {400: [QUERY]}
    ),
    "openai.retrieve_model": Doc(
        "openai",
        {200: ok("The model, loaded", OpenAIModelSchema)},
        {400: [QUERY], 404: ["model_not_found"]},
    ),
    "tokenize.tokenize": Doc(
        "tokenize",
        {200: ok("The token ids", TokenizeResponseSchema)},
        TOKENIZER_ERRORS,
        body=TokenizeRequestSchema,
        example={"model": "smollm2-135m-instruct", "text": "Once upon a time"},
    ),
    "tokenize.detokenize": Doc(
        "tokenize",
        {200: ok("The text", DetokenizeResponseSchema)},
        TOKENIZER_ERRORS,
        body=DetokenizeRequestSchema,
        example={"model": "smollm2-135m-instruct", "tokens": [9290, 2029, 253, 655]},
    ),
    "tokenize_compat.compat_tokenize": Doc(
        "tokenize",
        {200: ok("The token ids (vLLM's and llama.cpp's shape)", CompatTokenizeResponseSchema)},
        TOKENIZER_ERRORS,
        body=CompatTokenizeRequestSchema,
        example={"content": "Once upon a time", "with_pieces": True},
    ),
    "tokenize_compat.compat_detokenize": Doc(
        "tokenize",
        {200: ok("The text (vLLM's and llama.cpp's names)", CompatDetokenizeResponseSchema)},
        TOKENIZER_ERRORS,
        body=CompatDetokenizeRequestSchema,
        example={"tokens": [9290, 2029, 253, 655]},
    ),
    "openai.completions": Doc(
        "openai",
        {
            200: with_stream(
                ok("The completion (`stream: false`)", CompletionSchema),
                OPENAI_STREAM.format(kind="CompletionChunk"),
                OPENAI_STREAM_EXAMPLE,
            )
        },
        GENERATION_ERRORS,
        body=CompletionRequestSchema,
        example={"model": "smollm2-135m-instruct", "prompt": "Once upon a time", "max_tokens": 20},
    ),
    "openai.chat_completions": Doc(
        "openai",
        {
            200: with_stream(
                ok("The chat completion (`stream: false`)", ChatCompletionSchema),
                OPENAI_STREAM.format(kind="ChatCompletionChunk"),
                OPENAI_STREAM_EXAMPLE,
            )
        },
        GENERATION_ERRORS,
        body=ChatCompletionRequestSchema,
        example={
            "model": "smollm2-135m-instruct",
            "max_tokens": 40,
            "messages": [{"role": "user", "content": "Name three colours."}],
        },
    ),
    "console.page": Doc(
        "console",
        {200: ok("The operator console, a page for browsers", {"type": "string"}, "text/html")},
        security=[],
    ),
    "console.asset": Doc(
        "console",
        {200: ok("console.js or console.css", {"type": "string"}, "text/javascript")},
        {404: ["not_found"]},
        security=[],
    ),
    "prometheus.metrics": Doc(
        "metrics",
        {200: ok("Prometheus text format", {"type": "string"}, "text/plain")},
        security=[{}, {"bearerAuth": []}],
    ),
}

TAGS = [
    {"name": "generation", "description": "Text generation, whole or streamed (SSE)"},
    {"name": "models", "description": "The model catalog: list, load, unload, metrics"},
    {"name": "status", "description": "Server status and resource usage"},
    {"name": "console", "description": "The operator console's page and files (docs/console.md)"},
    {
        "name": "tokenize",
        "description": "A model's tokenizer: text or chat messages to token ids and back "
        "(under /api/v1, and at /tokenize and /detokenize with vLLM's and llama.cpp's names)",
    },
    {
        "name": "openai",
        "description": "OpenAI-compatible API (/v1); errors are OpenAI error objects",
    },
    {"name": "health", "description": "Liveness and readiness probes (not rate limited)"},
    {"name": "metrics", "description": "Prometheus metrics (not rate limited)"},
    {"name": "docs", "description": "This document (Swagger UI at /docs)"},
]

PATH_PARAMETERS = {
    "name": {
        "description": "A model name from the catalog (GET /api/v1/models); other "
        "names answer 404 model_not_found",
        "schema": {"type": "string", "pattern": NAME_PATTERN.pattern},
    },
    "model_id": {
        "description": "A loaded model's name (GET /v1/models); other names answer 404 "
        "model_not_found",
        "schema": {"type": "string"},
    },
}

# Schemas that no operation references directly: the stream frames.
EXTRA_SCHEMAS = (
    GenerateTextEventSchema,
    GeneratePromptLogprobsEventSchema,
    GenerateDoneSchema,
    CompletionChunkSchema,
    ChatCompletionChunkSchema,
    TokenPieceSchema,
)


def _header(description: str, required: bool = True, kind: str = "integer") -> dict:
    return {"description": description, "required": required, "schema": {"type": kind}}


# Not required: a request refused before the rate limiter ran (shutting_down) has none.
HEADERS = {  # components/headers
    "X-RateLimit-Limit": _header("Requests allowed per window", False),
    "X-RateLimit-Remaining": _header("Requests left in this window", False),
    "X-RateLimit-Reset": _header("When the window resets (Unix time)", False),
    # Only with a token budget (TURSI_TOKEN_RATE_LIMIT).
    "X-RateLimit-Limit-Tokens": _header("Tokens allowed per window (token budget)", False),
    "X-RateLimit-Remaining-Tokens": _header("Tokens left in this window", False),
    "X-RateLimit-Reset-Tokens": _header("When the token window refills (Unix time)", False),
    "Retry-After": _header("Seconds until the rate-limit window resets"),
    "WWW-Authenticate": _header('`Bearer realm="tursi"`', kind="string"),
}
RATE_LIMIT_HEADERS = (
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "X-RateLimit-Limit-Tokens",
    "X-RateLimit-Remaining-Tokens",
    "X-RateLimit-Reset-Tokens",
)
STATUS_HEADERS = {
    401: {"WWW-Authenticate": "WWW-Authenticate"},
    429: {"Retry-After": "Retry-After"},
    503: {
        "Retry-After": _header(
            "Seconds to wait (all codes but model_unloaded and model_failed)", required=False
        )
    },
}

DESCRIPTION = f"""Tursi serves language models over HTTP: the native API under `/api/v1`,
an OpenAI-compatible one under `/v1`, probes (`/health`, `/ready`) and Prometheus
metrics (`/metrics`). Human docs: `{DOCS_URL}` (not listed here, nor its assets).

**Authentication.** With API keys configured (TURSI_API_KEYS / TURSI_API_KEY_FILE) every
route needs `Authorization: Bearer <key>` (OPTIONS included, CORS preflights of the
configured origins aside) except `/health` (always open) and `/metrics` (open to loopback
clients); without keys the server is open. A non-ASCII key is sent as UTF-8.

**Rate limits.** One budget per client over `/api/v1` and `/v1`; their responses carry
`X-RateLimit-Limit`, `-Remaining`, `-Reset`; over the limit: `429` with `Retry-After`.
With a token budget (TURSI_TOKEN_RATE_LIMIT), generations also need their prompt tokens +
max_tokens x choices left in the client's window (charged: prompt + generated tokens), and
responses carry `X-RateLimit-Limit-Tokens`, `-Remaining-Tokens`, `-Reset-Tokens`.

**Requests.** Bodies are JSON objects sent as `application/json`; unknown fields are
rejected (`400 invalid_request`). Routes listed without parameters reject any query string.
HEAD and OPTIONS are answered automatically and not listed.

**Errors.** Every error is JSON: `{{"error": {{"code", "message", "details"}}}}` (schema
Error), on `/v1` OpenAI's error object (OpenAIError) with the same `code` and `details`.
A path that is no route answers `404 not_found`; a method a route does not take,
`405 method_not_allowed` with an `Allow` header. The codes:

| code | when |
| --- | --- |
""" + "\n".join(f"| `{code}` | {when} |" for code, when in ERROR_CODES.items())


# --- building ----------------------------------------------------------------------------


def documented_rules(app: Flask) -> list:
    """Every route but the Swagger UI pages."""
    return [
        rule for rule in app.url_map.iter_rules() if not rule.endpoint.startswith(SWAGGER_UI + ".")
    ]


def build_document(app: Flask) -> dict[str, Any]:
    from apispec import APISpec
    from apispec.ext.marshmallow import MarshmallowPlugin
    from apispec_webframeworks.flask import FlaskPlugin

    marshmallow = MarshmallowPlugin()
    spec = APISpec(
        title="Tursi",
        version=__version__,
        openapi_version="3.0.3",
        plugins=[marshmallow],
        info={"description": DESCRIPTION},
        security=[{"bearerAuth": []}],
        tags=TAGS,
    )
    marshmallow.converter.add_attribute_function(_field_extras)
    spec.components.security_scheme(
        "bearerAuth",
        {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key; needed only when the server has keys configured",
        },
    )
    for name, header in HEADERS.items():
        spec.components.header(name, header)
    for schema in EXTRA_SCHEMAS:
        spec.components.schema(schema.__name__.removesuffix("Schema"), schema=schema)
    for rule in documented_rules(app):
        doc = OPERATIONS.get(rule.endpoint)
        if doc is None:
            log.warning("no OpenAPI entry for the route %s (%s)", rule.rule, rule.endpoint)
        operation = _operation(rule, app.view_functions[rule.endpoint], doc)
        methods = sorted(rule.methods - {"HEAD", "OPTIONS"})
        spec.path(
            path=FlaskPlugin.flaskpath2openapi(rule.rule),
            operations={method.lower(): copy.deepcopy(operation) for method in methods},
            parameters=[
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    **PATH_PARAMETERS.get(name, {"schema": {"type": "string"}}),
                }
                for name in sorted(rule.arguments)
            ],
        )
    document = spec.to_dict()
    _strict_nullable_objects(document)
    for name, extras in SCHEMA_EXTRAS.items():
        document["components"]["schemas"][name].update(extras)
    return document


# What apispec cannot say of a whole schema (named as apispec names them).
SCHEMA_EXTRAS = {
    StructuredOutputsSchema.__name__.removesuffix("Schema"): {
        "description": "Exactly one way to constrain the output (docs/structured-output.md)",
        "minProperties": 1,
        "maxProperties": 1,
    },
}


def _operation(rule: Any, view: Any, doc: Doc | None) -> dict[str, Any]:
    summary, _, description = (inspect.getdoc(view) or rule.endpoint).partition("\n\n")
    operation: dict[str, Any] = {
        "operationId": rule.endpoint.replace(".", "_"),
        "summary": " ".join(summary.split()),
    }
    if description.strip():
        operation["description"] = description.strip()
    if doc is None:
        return {**operation, "responses": {"default": {"description": "Not documented"}}}
    operation["tags"] = [doc.tag]
    if doc.security is not None:
        operation["security"] = doc.security
    errors = {status: list(codes) for status, codes in doc.errors.items()}
    if doc.security != []:
        errors[401] = ["unauthorized"]
    if doc.body is not None:
        media = {"schema": doc.body}
        if doc.example is not None:
            media["example"] = doc.example
        operation["requestBody"] = {
            "required": doc.body_required,
            "content": {"application/json": media},
        }
        errors[408] = ["request_body_timeout"]
        errors[413] = ["payload_too_large"]
    rate_limited = is_api_path(rule.rule)
    if rate_limited:
        errors[429] = ["rate_limit_exceeded", *errors.get(429, [])]
    errors[500] = errors.get(500, []) + ["internal_error"]
    if rule.rule not in OPEN_PATHS:
        errors[503] = errors.get(503, []) + ["shutting_down"]
    responses = {str(status): dict(response) for status, response in doc.responses.items()}
    error_schema = OpenAIErrorSchema if is_openai_path(rule.rule) else ErrorSchema
    for status in sorted(errors):
        lines = "\n".join(f"- `{code}`: {ERROR_CODES[code]}" for code in errors[status])
        responses[str(status)] = {
            "description": f"{HTTPStatus(status).phrase}:\n{lines}",
            "content": {"application/json": {"schema": error_schema}},
        }
        if status in STATUS_HEADERS:
            responses[str(status)]["headers"] = dict(STATUS_HEADERS[status])
    if rate_limited:
        for response in responses.values():
            response["headers"] = {
                **{name: name for name in RATE_LIMIT_HEADERS},
                **response.get("headers", {}),
            }
    operation["responses"] = responses
    return operation


def _field_extras(self: Any, field: ma_fields.Field, ret: dict, **_: Any) -> dict:
    """apispec attribute function: what it leaves out of our fields (exclusive bounds,
    object sizes, null as the default of every optional request field) and the fields that
    take several shapes (OpenAI's string-or-list fields, logit_bias)."""
    extras: dict[str, Any] = {}
    if isinstance(field.parent, StrictSchema) and not field.required:
        extras["nullable"] = True  # StrictSchema: null means the default
    for validator in field.validators:
        if isinstance(validator, validate.Range):
            if validator.min is not None and not validator.min_inclusive:
                extras["exclusiveMinimum"] = True
            if validator.max is not None and not validator.max_inclusive:
                extras["exclusiveMaximum"] = True
    if isinstance(field, ma_fields.Dict):
        for length, size in (("minLength", "minProperties"), ("maxLength", "maxProperties")):
            if length in ret:
                extras[size] = ret.pop(length)
    if isinstance(field, TextOrList):
        extras.pop("nullable", None)
        text = {**self.field2property(field.items.inner), "nullable": True}
        extras["anyOf"] = [text, self.field2property(field.items)]
    if isinstance(field, Prompts):
        extras["anyOf"] = _prompt_schemas()
    if isinstance(field, JsonSchemaText):  # null is the string branch's, as for TextOrList
        nullable = extras.pop("nullable", False)
        extras["anyOf"] = [
            {"type": "object", "description": "a JSON schema"},
            {"type": "string", "nullable": nullable, "description": "a JSON schema as text"},
        ]
    if isinstance(field, LogitBias):
        extras.update(
            type="object",
            maxProperties=MAX_LOGIT_BIAS,
            additionalProperties={"type": "number", "minimum": -100, "maximum": 100},
            description="token id (a string of digits) -> bias added to its logit",
        )
    if isinstance(field, ToolChoice):
        extras["anyOf"] = [
            {"type": "string", "enum": list(TOOL_CHOICES)},
            self.resolve_nested_schema(NamedToolChoiceSchema),
        ]
    if isinstance(field, MessageContent):
        extras["anyOf"] = [
            {"type": "string"},
            {
                "type": "array",
                "items": self.resolve_nested_schema(ContentPartSchema),
                "description": "text parts, joined",
            },
        ]
    return extras


def _prompt_schemas() -> list[dict[str, Any]]:
    """/v1/completions' prompt: a string, a list of token ids, or a list of prompts, each a
    string or a list of token ids."""
    text = {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS}
    ids = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0},
        "minItems": 1,
        "maxItems": MAX_PROMPT_TOKENS,
    }
    prompts = {"anyOf": [text, ids]}
    return [text, ids, {"type": "array", "items": prompts, "minItems": 1, "maxItems": MAX_PROMPTS}]


def _strict_nullable_objects(node: Any) -> None:
    """apispec writes a nullable nested schema as anyOf [$ref, {type: object, nullable}],
    whose second branch takes any object; make it take only null."""
    if isinstance(node, dict):
        for option in node.get("anyOf", []):
            if option == {"type": "object", "nullable": True}:
                option["enum"] = [None]
        for value in node.values():
            _strict_nullable_objects(value)
    elif isinstance(node, list):
        for value in node:
            _strict_nullable_objects(value)
