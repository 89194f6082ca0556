"""Request accounting: every response counts once, when it ends (a stream when its last frame
is out), in the app's JSON request counters (API routes only, GET /status) and in the
Prometheus metrics (every route: duration by method, route and status; errors by code).

How a request went is one `RequestOutcome`, kept under one key of its WSGI environ: the
error handlers and the stream relay write it, this hook reads it. Not flask.g: a stream
ends after the request context is gone."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, request

from ..metrics import ERRORS, REQUEST_DURATION
from .auth import is_api_path
from .state import AppState

_ENVIRON_KEY = "tursi.outcome"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass
class RequestOutcome:
    """How one request went, as far as the counters care."""

    started: float  # time.perf_counter() when the WSGI call began
    error_code: str | None = None  # the error answered, or the one a stream ended with
    stream_finished: bool = False  # a stream reached its end (a `done`, not an error)


def outcome(environ: dict[str, Any] | None = None) -> RequestOutcome:
    """The outcome of the current request (or of the one whose WSGI environ is given)."""
    return (request.environ if environ is None else environ)[_ENVIRON_KEY]


def init_app(app: Flask, state: AppState) -> None:
    """Give every request its outcome as the WSGI call begins; count it as it ends."""
    app.wsgi_app = _stamp_start(app.wsgi_app)

    @app.after_request
    def _account(response: Response) -> Response:
        this, status = outcome(), response.status_code
        end = functools.partial(_ended, state, this, _labels(status), is_api_path(request.path))
        if response.is_streamed and status < 400:
            # A stream that started well is a success only if it reached its end.
            response.call_on_close(lambda: end(this.stream_finished))
        else:
            end(status < 400)
        return response


def _stamp_start(wsgi_app: Any) -> Any:
    """Time from the WSGI call on, so requests refused by earlier hooks (401, 429) count."""

    def timed(environ: dict[str, Any], start_response: Any) -> Any:
        environ[_ENVIRON_KEY] = RequestOutcome(time.perf_counter())
        return wsgi_app(environ, start_response)

    return timed


def _labels(status: int) -> tuple[str, str, str]:
    rule = request.url_rule
    return (
        request.method if request.method in _METHODS else "other",
        rule.rule if rule is not None else "unmatched",
        str(status),
    )


def _ended(
    state: AppState, this: RequestOutcome, labels: tuple[str, str, str], api: bool, ok: bool
) -> None:
    REQUEST_DURATION.labels(*labels).observe(time.perf_counter() - this.started)
    if this.error_code:
        ERRORS.labels(this.error_code).inc()
    if api:
        state.requests.record(ok)
