"""Error types, raised deep (engine, schemas, auth) and turned into HTTP in tursi.api.errors.

Every 4xx/5xx body is ``{"error": {"code", "message", "details"}}``.
"""

from __future__ import annotations

from typing import Any


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The body of every 4xx/5xx response."""
    return {"error": {"code": code, "message": message, "details": details or {}}}


class TursiError(Exception):
    """An error with an HTTP status, a stable machine-readable code and details."""

    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)


class InvalidRequest(TursiError):
    status, code = 400, "invalid_request"


class ClientDisconnected(TursiError):
    """The client went away before its answer was ready. Nobody receives this response; it
    is the status nginx logs for the same case, so access logs and metrics show it."""

    status, code = 499, "client_disconnected"


class RequestBodyTimeout(TursiError):
    """The request's body did not arrive within TURSI_BODY_TIMEOUT (tursi.api.bodies); the
    connection closes after this answer."""

    status, code = 408, "request_body_timeout"


class ContextLengthExceeded(TursiError):
    status, code = 400, "context_length_exceeded"


class Unauthorized(TursiError):
    status, code = 401, "unauthorized"


class ModelNotFound(TursiError):
    status, code = 404, "model_not_found"

    def __init__(self, name: str, available: list[str]):
        super().__init__(
            f"The requested model '{name}' was not found", {"available_models": available}
        )


class ModelNotLoaded(TursiError):
    status, code = 409, "model_not_loaded"


class ModelLoading(TursiError):
    status, code = 503, "model_loading"


class LoadInProgress(TursiError):
    """Unload asked while the model loads: the request conflicts with the model's state."""

    status, code = 409, "load_in_progress"


class ModelConflict(TursiError):
    status, code = 409, "model_conflict"


class ModelUnloaded(TursiError):
    status, code = 503, "model_unloaded"


class ModelFailed(TursiError):
    """The model's engine died (its thread crashed) or got stuck (TURSI_STEP_TIMEOUT)."""

    status, code = 503, "model_failed"


class TokenRateLimitExceeded(TursiError):
    """The client's token budget left in this window does not cover the request."""

    status, code = 429, "token_rate_limit_exceeded"


class RequestOverTokenLimit(TursiError):
    """The request alone needs more tokens than the whole budget of a window: no wait helps."""

    status, code = 429, "request_exceeds_token_limit"


class NotReady(TursiError):
    status, code = 503, "not_ready"


class ShuttingDown(TursiError):
    status, code = 503, "shutting_down"


class Overloaded(TursiError):
    status, code = 503, "overloaded"


class RequestTimeout(TursiError):
    status, code = 504, "request_timeout"


class InsufficientMemory(TursiError):
    status, code = 507, "insufficient_memory"


class UnsupportedQuantization(TursiError):
    status, code = 400, "unsupported_quantization"


class GenerationFailed(TursiError):
    status, code = 500, "generation_failed"
