"""The one place that turns every failure into a JSON error response, never an HTML page."""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, g, jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from ..errors import TursiError

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str,
                   details: dict[str, Any] | None = None, headers: dict[str, str] | None = None):
    response = jsonify({"error": {"code": code, "message": message, "details": details or {}}})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


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
        g.retry_after = exc.headers["Retry-After"]  # see tursi.limits
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


def _on_validation_error(exc: ValidationError):
    return error_response(400, "invalid_request", "The request is not valid",
                          {"fields": exc.normalized_messages()})


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
