"""The one place that turns every failure into a JSON error response, never an HTML page.

/api/v1 (and everything else) answers `{"error": {"code", "message", "details"}}`; the
OpenAI-compatible /v1 routes answer OpenAI's error object, which carries the same three
fields plus `type` and `param`, so OpenAI clients raise their usual exceptions."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, g, jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from ..errors import TursiError, error_body
from .accounting import outcome
from .auth import is_openai_path

log = logging.getLogger(__name__)


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
):
    outcome().error_code = code  # counted by tursi.api.accounting
    details = details or {}
    if is_openai_path(request.path):
        body = openai_error_body(status, code, message, details)
    else:
        body = error_body(code, message, details)
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    if not retryable(status, code):
        response.headers["x-should-retry"] = "false"
    return response


# The 409 that goes away by itself: the load ends, then the unload can run; the 408 of a
# body that came too slowly, which a retry on a better connection can deliver.
_RETRYABLE_CODES = {"load_in_progress", "request_body_timeout"}
# Errors that a retry only repeats: the same generation runs past the same deadline, the
# same model does not fit the same memory, the same request needs more than a whole
# window's token budget.
_FINAL_CODES = {"request_timeout", "insufficient_memory", "request_exceeds_token_limit"}


def retryable(status: int, code: str) -> bool:
    """Whether the same request may succeed later. The openai SDK retries 408, 409, 429 and
    5xx answers twice by default unless `x-should-retry: false` says otherwise: without it,
    a 409 model_not_loaded or a 504 after a 300 s generation would run three times. 429s
    (but request_exceeds_token_limit), 503s (loading, overloaded, shutting down),
    load_in_progress and request_body_timeout stay retryable."""
    if code in _FINAL_CODES:
        return False
    if status < 500:
        return status == 429 or code in _RETRYABLE_CODES
    return True


def openai_error_body(
    status: int, code: str, message: str, details: dict[str, Any]
) -> dict[str, Any]:
    """OpenAI's error object: `type` from the status; `param`, the first invalid field."""
    if status >= 500:
        kind = "server_error"
    else:
        kind = _OPENAI_TYPES.get(status, "invalid_request_error")
    fields = details.get("fields")
    param = next(iter(fields)) if isinstance(fields, dict) and fields else None
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code,
            "details": details,
        }
    }


_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


# Flask/werkzeug statuses we can meet, as stable codes.
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "rate_limit_exceeded",
}


def _on_tursi_error(exc: TursiError):
    if "Retry-After" in exc.headers:
        g.retry_after = exc.headers["Retry-After"]  # see tursi.api.limits
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


def _on_validation_error(exc: ValidationError):
    fields = exc.normalized_messages()
    message = "The request is not valid"
    if isinstance(fields, dict) and fields:
        name, problems = next(iter(fields.items()))
        message += f": {name}: {_first(problems)}"
    return error_response(400, "invalid_request", message, {"fields": fields})


def _first(problems: Any) -> str:
    """The first message in marshmallow's nested lists/dicts of messages."""
    while isinstance(problems, (list, dict)) and problems:
        problems = problems[0] if isinstance(problems, list) else next(iter(problems.values()))
    return str(problems)


def _on_http_exception(exc: HTTPException):
    status = exc.code or 500
    code = _HTTP_CODES.get(status, "http_error")
    details: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if status == 405 and getattr(exc, "valid_methods", None):
        details["allowed_methods"] = sorted(exc.valid_methods)
        headers["Allow"] = ", ".join(sorted(exc.valid_methods))
    if status == 413:
        message = "The request body is larger than this server accepts"
    elif status == 429:
        # flask-limiter's RateLimitExceeded: its description names the limit.
        message = f"Rate limit exceeded: {exc.description}"
        details["limit"] = str(exc.description)
    else:
        message = exc.description or exc.name
    return error_response(status, code, message, details, headers)


def _on_unexpected(exc: Exception):
    log.exception("unhandled error")
    return error_response(500, "internal_error", "The server failed to handle this request")


def init_app(app: Flask) -> None:
    app.register_error_handler(TursiError, _on_tursi_error)
    app.register_error_handler(ValidationError, _on_validation_error)
    app.register_error_handler(HTTPException, _on_http_exception)
    app.register_error_handler(Exception, _on_unexpected)
