"""GET /metrics (Prometheus text format), who may read it, and the request hooks that
time every response and count errors by code (see tursi.metrics and docs/prometheus.md)."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request

from ..metrics import ERRORS, REQUEST_DURATION, exposition
from .auth import bearer_token, key_is_valid, unauthorized

bp = Blueprint("prometheus", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics (text format).

    Open without API keys and to loopback clients; otherwise a valid key is needed (see
    scrape_allowed())."""
    if not scrape_allowed():
        raise unauthorized()
    body, content_type = exposition()
    return Response(body, content_type=content_type)


def scrape_allowed() -> bool:
    """Open without API keys and to loopback clients; otherwise a valid key is needed."""
    keys = current_app.extensions.get("tursi.api_keys") or []
    return not keys or is_loopback(request.remote_addr) or key_is_valid(bearer_token(), keys)


def is_loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


# --- request hooks -------------------------------------------------------------------------

_STARTED = "tursi.started"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def init_app(app: Flask) -> None:
    """Register GET /metrics and the request hooks that feed it."""
    app.register_blueprint(bp)
    app.wsgi_app = _stamp_start(app.wsgi_app)
    app.after_request(_observe)


def _stamp_start(wsgi_app: Any) -> Any:
    """Time from the WSGI call on, so requests refused by earlier hooks (401, 429) count."""

    def timed(environ: dict[str, Any], start_response: Any) -> Any:
        environ[_STARTED] = time.perf_counter()
        return wsgi_app(environ, start_response)

    return timed


def _observe(response: Response) -> Response:
    """Count every response: error codes now, durations now or, for a stream, when it ends."""
    environ = request.environ
    rule = request.url_rule
    labels = (
        request.method if request.method in _METHODS else "other",
        rule.rule if rule is not None else "unmatched",
        str(response.status_code),
    )
    code = g.get("error_code")
    if code:
        ERRORS.labels(code).inc()
    if response.is_streamed and response.status_code < 400:
        response.call_on_close(lambda: _request_ended(environ, labels))
    else:
        _request_ended(environ, labels)
    return response


def _request_ended(environ: dict[str, Any], labels: tuple[str, str, str]) -> None:
    started = environ.get(_STARTED)
    if started is not None:
        REQUEST_DURATION.labels(*labels).observe(time.perf_counter() - started)
    stream_error = environ.get("tursi.stream_error")
    if stream_error:
        ERRORS.labels(stream_error).inc()
